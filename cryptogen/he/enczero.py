"""The export's encryption of zero, made ahead on a helper thread (issue #11: the export was the
largest part of a shipped decode step; its Enc(0) ~6 ms of ~14 per export).

Enc_pk(0) at the data level (noise.py rule 1b; ``ServerEngine._enc_zero``) depends on nothing but the
session's public key and fresh randomness, so it can be made before the ciphertext it re-randomises
exists. ``ZeroPool`` keeps up to ``depth`` of them in the making on one helper thread per process:
  1. ``take(k)`` pops the oldest one for k primes (made earlier, or waits for the one in the making;
     with none asked for yet it makes one in the calling thread);
  2. it asks the helper for the next ones, up to ``depth`` waiting;
  3. each one is handed out exactly once (popped), then dropped by the export that added it.
The NTTs and multiply-accumulates inside release the GIL (he/_ntt.c), so the helper runs on the
second core while the server waits for the client or runs Python (2 cores here: in one process both
parties' threads share them).
Who learns what: nothing new. Each Enc(0) is drawn from field.random_bytes (AES-256-CTR under a fresh
os.urandom key per call) exactly as when made inline, and used once.
Memory: depth * 2 k n words (2 MiB at depth 2, N = 16384, k = 4) per engine, i.e. per session.
``CRYPTOGEN_ENC0_AHEAD=0`` makes every one inline (A/B runs).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..field import random_bytes
from . import ntt
from .wire import cbd_noise

AHEAD_ENV = "CRYPTOGEN_ENC0_AHEAD"
DEFAULT_DEPTH = 2

_HELPER: ThreadPoolExecutor | None = None
_HELPER_LOCK = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _HELPER
    with _HELPER_LOCK:
        if _HELPER is None:
            _HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cryptogen-enc0")
        return _HELPER


def ternary(n: int) -> np.ndarray:
    """n values uniform in {-1, 0, 1} (int64): bytes below 252 = 3 * 84 kept, each mod 3, minus 1."""
    out, have = np.empty(n, np.int64), 0
    while have < n:
        b = np.frombuffer(random_bytes(n - have + 64), dtype=np.uint8)
        b = b[b < 252][:n - have]
        out[have:have + b.size] = b.astype(np.int64) % 3 - 1
        have += b.size
    return out


def lift(x: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Small signed integers (..., n) -> residues (..., k, n) mod each of qs (k,)."""
    x = x[..., None, :]
    q = qs[:, None]
    return np.where(x < 0, q - (-x).astype(np.uint64), x.astype(np.uint64))


def enc_zero(tb: ntt.Tables, pk_ntt: np.ndarray) -> np.ndarray:
    """Enc_pk(0) over ``tb``'s k primes, (2, k, n) coefficient-form words: (pk0 u + e0, pk1 u + e1),
    ``pk_ntt`` (1, 2, k, n) the public key's rows of those primes in NTT form. k forward and 2k
    inverse NTTs."""
    n = pk_ntt.shape[-1]
    u = ntt.forward(tb, np.ascontiguousarray(lift(ternary(n), tb.qs)))
    out = ntt.inverse(tb, ntt.mac(tb, pk_ntt, u[None], np.zeros(1, np.int64)))
    out += lift(cbd_noise(2 * n).reshape(2, n), tb.qs)
    qs = tb.qs[:, None]
    np.subtract(out, qs, out=out, where=out >= qs)
    return out


def default_depth() -> int:
    raw = os.environ.get(AHEAD_ENV, str(DEFAULT_DEPTH))
    return int(raw) if raw.isdigit() else DEFAULT_DEPTH


class ZeroPool:
    """Encryptions of zero made ahead: ``make(k)`` -> (2, k, n) words, called on the helper thread."""

    def __init__(self, make: Callable[[int], np.ndarray], depth: int | None = None):
        self._make = make
        self.depth = default_depth() if depth is None else max(0, int(depth))
        self._waiting: dict[int, deque[Future]] = {}
        self._lock = threading.Lock()

    def take(self, k: int) -> np.ndarray:
        with self._lock:
            q = self._waiting.setdefault(k, deque())
            ready = q.popleft() if q else None
            while len(q) < self.depth:
                q.append(_helper().submit(self._make, k))
        return ready.result() if ready is not None else self._make(k)

    def drop(self) -> None:
        """Forget what is waiting (it is never handed out)."""
        with self._lock:
            for q in self._waiting.values():
                for f in q:
                    f.cancel()
            self._waiting.clear()
