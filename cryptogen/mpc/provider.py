"""Correlated randomness behind one provider interface, with an offline/online split.

Kinds (all over Z_t, additive shares):

* ``triple``  — Beaver triple (a, b, c = a*b), elementwise;
* ``matrix``  — matrix Beaver triple (A, B, C = A@B) of a given (m, k, n);
* ``bits``    — "solved bits" (Damgård–Fitzi–Kiltz–Nielsen–Toft 2006): a uniform r in Z_t
  together with shares of each of its L = bitlen(t) bits; used by truncation and DReLU.

A *provider* (``DealerProvider`` here, ``HEProvider`` in ``provider_he.py``) hands each party a
*source*: ``provider.source(role, channel, party)``. A source keeps a FIFO pool per kind;
``preprocess(...)`` fills it ahead of time (offline phase) and the protocols consume from it
(online). Both parties consume identical amounts in identical order, so their pools stay
aligned; if a pool runs short it is refilled on demand (same decision on both sides, because
it depends only on public sizes), counted as offline work. Counters: ``produced`` and
``consumed`` per kind.

Dealer model (CrypTen TTP / SIGMA): ``Dealer`` is a separate party that never sees inputs; its
methods return two per-party bundles (dicts of arrays). In tests it runs in-process and the
``DealerProvider`` routes the bundles into the two parties' pools; as a Ray actor it would send
each bundle to its party. The client and the server must not collude with the dealer.
"""
from __future__ import annotations

import os
import threading
from collections import Counter, deque

import numpy as np

from ..field import DEFAULT_T, mul, matmul, random_elements
from . import dcf
from .errors import ProviderError, ShapeError

KINDS = ("triple", "matrix", "bits", "tbits")  # the order gives the dealer requests' kind codes
DCF_OUTPUTS = {"bits": 2, "tbits": 1}  # solved bits with a DCF key: DReLU's two outputs, a truncation's one


def nbits(t: int) -> int:
    return int(t - 1).bit_length()


NEXT_STEP_MARGIN = 1.02  # the next decode step's dealer items, as a multiple of the last step's (+ growth)


def next_step_items(took: int, decoded_at: int) -> int:
    """How many items of a kind to make ahead for the decode step after the one at position
    ``decoded_at``, which took ``took`` of them: ``took`` times ``NEXT_STEP_MARGIN`` + 2 / (p + 1). The
    next step attends to one more position, so its attention (recompute: its whole softmax) grows by up
    to 2 / (p + 1); the margin covers the rest. The one rule for the remote dealer's step-ahead asks
    and the in-process bench's (callers cap it)."""
    return int(took * (NEXT_STEP_MARGIN + 2 / (int(decoded_at) + 1)))


class _Fifo:
    """FIFO of items made of aligned arrays with a leading 'count' axis."""

    def __init__(self):
        self.chunks: deque = deque()
        self.size = 0

    def push(self, arrays: tuple) -> None:
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ProviderError("inconsistent correlated-randomness bundle")
        if n:
            self.chunks.append(tuple(arrays))
            self.size += n

    def take(self, n: int) -> tuple:
        if n > self.size:
            raise ProviderError("pool underflow")
        parts, got = [], 0
        while got < n:
            ch = self.chunks[0]
            k = min(n - got, len(ch[0]))
            parts.append(tuple(a[:k] for a in ch))
            if k == len(ch[0]):
                self.chunks.popleft()
            else:
                self.chunks[0] = tuple(a[k:] for a in ch)
            got += k
        self.size -= n
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


class Source:
    """One party's end of a provider: pools, counters, and the consume API used by protocols."""

    name = "abstract"
    dcf = False  # True when each solved-bits item carries a DCF key (dealer providers)
    min_batch = {"triple": 4096, "bits": 1024, "tbits": 1024, "matrix": 1}

    def __init__(self, role: str, t: int):
        self.role, self.t, self.L = role, t, nbits(t)
        self.pools: dict = {}
        self.produced: Counter = Counter()
        self.consumed: Counter = Counter()

    # -- to implement: produce `count` items of a kind into this party's pool ----------------
    def _refill(self, kind: str, count: int, key=None) -> None:
        raise NotImplementedError

    # -- pool plumbing -----------------------------------------------------------------------
    def _pool(self, kind, key=None) -> _Fifo:
        return self.pools.setdefault((kind, key), _Fifo())

    def _push(self, kind, arrays, key=None):
        self._pool(kind, key).push(arrays)
        self.produced[kind] += len(arrays[0])

    def _take(self, kind, count, key=None):
        pool = self._pool(kind, key)
        if pool.size < count:
            need = count - pool.size
            self._refill(kind, max(need, self.min_batch[kind]), key)
        self.consumed[kind] += count
        return pool.take(count)

    def preprocess(self, triples: int = 0, bits: int = 0, matrix: dict | None = None, tbits: int = 0) -> None:
        """Offline phase: make the pools hold at least this many items (both parties call it)."""
        if tbits and not self.dcf:
            raise ProviderError(f"the {self.name} provider makes no DCF keys (tbits)")
        for kind, n in (("triple", triples), ("bits", bits), ("tbits", tbits)):
            short = n - self._pool(kind).size
            if short > 0:
                self._refill(kind, short)
        for key, n in (matrix or {}).items():
            short = n - self._pool("matrix", tuple(key)).size
            if short > 0:
                self._refill("matrix", short, tuple(key))

    def counters(self) -> dict:
        return dict(provider=self.name, produced=dict(self.produced), consumed=dict(self.consumed))

    # -- consume API -------------------------------------------------------------------------
    def triples(self, shape):
        """Shares (a, b, c) of Beaver triples c = a*b, each of the given shape."""
        shape = tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        a, b, c = self._take("triple", n)
        return a.reshape(shape), b.reshape(shape), c.reshape(shape)

    def solved_bits(self, shape):
        """(bits, r): shares of the L bits (LSB first, last axis) of a uniform r in Z_t, and of r."""
        shape = tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        bits, r = self._take("bits", n)[:2]
        return bits.reshape(shape + (self.L,)), r.reshape(shape)

    def solved_bits_dcf(self, shape, outputs: int = 2):
        """(bits, r, key): solved bits with this party's DCF key (``dcf.eval_``) for
        (1, 1 - 2 r_0)[c < r] (DReLU: kind "bits"), or, with ``outputs=1``, for [c < r] alone (a
        truncation: kind "tbits", a key of 131 words instead of 174)."""
        if not self.dcf:
            raise ProviderError(f"the {self.name} provider makes no DCF keys")
        shape = tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        bits, r, key = self._take(next(k for k, o in DCF_OUTPUTS.items() if o == outputs), n)
        return bits.reshape(shape + (self.L,)), r.reshape(shape), key

    def matrix_triple(self, m: int, k: int, n: int):
        """Shares (A, B, C = A@B) with A (m,k), B (k,n)."""
        A, B, C = self._take("matrix", 1, (m, k, n))
        return A[0], B[0], C[0]


# ------------------------------------------------------------------------------------------
class Dealer:
    """Trusted dealer: produces correlated randomness only, never sees inputs.

    Each method returns ``(client_bundle, server_bundle)``; a bundle is a dict of arrays.
    """

    name = "dealer"

    def __init__(self, t: int = DEFAULT_T):
        self.t = t
        self.L = nbits(t)

    def _split(self, x):
        r = random_elements(x.shape, self.t)
        return np.mod(x - r, self.t), r

    def triples(self, n: int):
        a, b = random_elements(n, self.t), random_elements(n, self.t)
        parts = [self._split(v) for v in (a, b, mul(a, b, self.t))]
        return tuple({k: parts[i][j] for i, k in enumerate("abc")} for j in (0, 1))

    def solved_bits(self, n: int, outputs: int = 2):
        """Solved bits, each with a DCF key pair for [c < r] (``dcf.py``): beta = (1, 1 - 2 r_0)
        (DReLU), or beta = 1 with ``outputs=1`` (a truncation)."""
        r = random_elements(n, self.t)
        bits = ((r[:, None] >> np.arange(self.L)) & 1).astype(np.int64)
        (bc, bs), (rc, rs) = self._split(bits), self._split(r)
        beta = np.ones(n, np.int64) if outputs == 1 else \
            np.stack([np.ones(n, np.int64), np.mod(1 - 2 * bits[:, 0], self.t)], -1)
        kc, ks = dcf.gen(r, beta, self.L, self.t)
        return {"bits": bc, "r": rc, "key": kc}, {"bits": bs, "r": rs, "key": ks}

    def make(self, kind: str, count: int, key=None):
        """(client_bundle, server_bundle) of ``count`` items of ``kind`` (matrix: key = (m, k, n))."""
        if kind == "triple":
            return self.triples(count)
        if kind in DCF_OUTPUTS:
            return self.solved_bits(count, DCF_OUTPUTS[kind])
        if kind == "matrix":
            return self.matrix_triples(count, *key)
        raise ProviderError(f"unknown kind {kind!r}")

    def matrix_triples(self, count: int, m: int, k: int, n: int):
        A = random_elements((count, m, k), self.t)
        B = random_elements((count, k, n), self.t)
        C = np.stack([matmul(A[i], B[i], self.t) for i in range(count)])
        parts = [self._split(v) for v in (A, B, C)]
        return tuple({k_: parts[i][j] for i, k_ in enumerate("ABC")} for j in (0, 1))


MAKE_BATCH = 1 << 16  # items per batch of the in-process dealer (DealerProvider.refill_locked)
_FIELDS = {"triple": "abc", "bits": ("bits", "r", "key"), "tbits": ("bits", "r", "key"), "matrix": "ABC"}


class DealerProvider:
    """Routes a Dealer's bundles into the two parties' pools (both parties in one process)."""

    name = "dealer"

    def __init__(self, dealer: Dealer | None = None, t: int = DEFAULT_T, dcf: bool = True):
        self.dealer = dealer or Dealer(t)
        self.tag = "dealer:" + os.urandom(8).hex()  # both parties must draw from one dealer session
        self._lock = threading.Lock()
        self._sources: dict = {}
        self.dcf = dcf  # False: comparisons by the Beaver circuit, as with the HE provider

    def source(self, role, channel=None, party=None) -> "DealerSource":
        if role in self._sources:
            raise ProviderError(f"a {role} source already exists for this provider")
        if party is not None and party.t != self.dealer.t:
            raise ProviderError("dealer and party use different field moduli")
        self._sources[role] = DealerSource(self, role)
        return self._sources[role]

    def refill_locked(self, kind: str, count: int, key=None) -> None:
        """Make `count` items and push each party's bundle into its pool (caller holds the lock), at
        most ``MAKE_BATCH`` items per batch: one batch of a GPT-2 step's 860,000 DCF items is ~3.8 GB
        made at once, which the heap cannot take from the holes the step left, so it grew and faulted
        every page in again (12 s of system time of 15 s at 127 context, docs/BENCHMARKS.md)."""
        for role in ("client", "server"):
            if role not in self._sources:
                raise ProviderError(f"no {role} source registered with the dealer")
        while count > 0:
            n = min(count, MAKE_BATCH)
            bundles = self.dealer.make(kind, n, key)
            for role, bundle in zip(("client", "server"), bundles):
                self._sources[role]._push(kind, tuple(bundle[f] for f in _FIELDS[kind]), key)
            count -= n


class DealerSource(Source):
    name = "dealer"

    def __init__(self, provider: DealerProvider, role: str):
        super().__init__(role, provider.dealer.t)
        self.provider = provider

    @property
    def dcf(self) -> bool:
        return self.provider.dcf

    def _take(self, kind, count, key=None):
        # both parties' pools are touched by either thread: every pool access holds the lock
        with self.provider._lock:
            return super()._take(kind, count, key)

    def preprocess(self, *args, **kwargs):
        with self.provider._lock:
            super().preprocess(*args, **kwargs)

    def _refill(self, kind, count, key=None):
        self.provider.refill_locked(kind, count, key)


def check_shape(*arrays) -> tuple:
    """Common shape of arrays, or ShapeError."""
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) != 1:
        raise ShapeError(f"operand shapes differ: {sorted(shapes)}")
    return shapes.pop()


# ------------------------------------------------------------------------------------------
class DealerService:
    """A Dealer that serves each party its own bundles on request (the shape of a Ray actor).

    Each party asks ``fetch(role, seq, kind, count, key)`` with its own running sequence
    number; both parties make the same requests in the same order, so request ``seq`` of the
    client and of the server are the two halves of one dealer output. The first of the two to
    arrive makes the output and keeps the other half until its owner fetches it.
    """

    def __init__(self, dealer: Dealer | None = None, t: int = DEFAULT_T):
        self.dealer = dealer or Dealer(t)
        self.tag = "dealer-service:" + os.urandom(8).hex()
        self._lock = threading.Lock()
        self._pending: dict = {}

    def fetch(self, role: str, seq: int, kind: str, count: int, key=None) -> dict:
        other = "server" if role == "client" else "client"
        with self._lock:
            item = self._pending.pop((role, seq), None)
            if item is not None:
                if item[0] != (kind, count, key):
                    raise ProviderError("the two parties requested different correlated randomness")
                return item[1]
            bundles = self.dealer.make(kind, count, key)
            mine, theirs = bundles if role == "client" else bundles[::-1]
            self._pending[(other, seq)] = ((kind, count, key), theirs)
            return mine


class FetchSource(Source):
    """A party's source that pulls its bundles from a dealer through ``fetch`` (e.g. a Ray call)."""

    name = "dealer"
    dcf = True

    def __init__(self, role: str, t: int, fetch):
        super().__init__(role, t)
        self.fetch, self.seq = fetch, 0

    def _refill(self, kind, count, key=None):
        bundle = self.fetch(self.role, self.seq, kind, count, key)
        self.seq += 1
        self._push(kind, tuple(bundle[f] for f in _FIELDS[kind]), key)


class ServiceDealerProvider:
    """Provider over a ``DealerService`` (in-process here; a Ray actor handle's fetch later)."""

    name = "dealer"

    def __init__(self, service: DealerService | None = None, fetch=None, tag: str | None = None):
        self.service = service or DealerService()
        self.fetch = fetch or self.service.fetch
        self.tag = tag or self.service.tag

    def source(self, role, channel=None, party=None) -> FetchSource:
        t = party.t if party is not None else self.service.dealer.t
        if t != self.service.dealer.t:
            raise ProviderError("dealer and party use different field moduli")
        return FetchSource(role, t, self.fetch)
