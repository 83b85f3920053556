"""NTT-domain multiply-accumulate for the linear layers (issue #11, "HE kernels at the floor").

Construction: a BFV ct x pt is, prime by prime, a negacyclic product in Z_q[X]/(X^N + 1). SEAL
(through Pyfhel 3.5.0) computes each one as 5L NTTs (L on the plaintext, 2L forward and 2L
inverse on the ciphertext) around a dyadic product. A linear layer's giant step
Z_b = sum_a rot(x, a) * W'_{a,b} (he/linear.py) needs only:
  1. each baby ciphertext rot(x, a) in NTT form: 2L forward NTTs, once per input, shared by every
     output and giant step;
  2. the weights' plaintexts in NTT form: L forward NTTs each, once at set-up;
  3. per Z_b a dyadic multiply-accumulate (128-bit sums, one reduction per coefficient) and 2L
     inverse NTTs (``_ntt.c``).
The plaintext is lifted to each q_i as SEAL lifts it (coefficients >= (t+1)/2 become c - t, i.e.
centred), so Z_b is word for word what ``sum_a multiply_plain(rot(x, a), W'_{a,b})`` gives: the same
ciphertext, the same noise (tests/he/test_ntt.py checks the bytes). The NTT itself is ours, not
SEAL's (Pyfhel exposes none), with SEAL's psi (the smallest primitive 2N-th root of unity) and
SEAL's bit-reversed order, so NTT-form words are SEAL's (its Galois keys: he/hoist.py).
Who learns what: nothing changes; the server computes on the ciphertexts it already holds.
Cost (N = 16384, 4 primes; docs/BENCHMARKS.md "NTT-domain linear layers"): one NTT ~0.2-0.4 ms,
one term of the multiply-accumulate ~0.1-0.2 ms, against ~5-6 ms for a Pyfhel ct x pt.
Memory: an NTT-form plaintext is L words per coefficient (4x a SEAL plaintext's N words).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from Pyfhel import PyCtxt

from .errors import SerializationError
from .wire import PLAIN_PREFIX, PREFIX, read_prefix

try:  # built by ``pip install -e .`` (setup.py); bin/bootstrap always does
    from . import _ntt
except ImportError:  # pragma: no cover - a checkout without the build step
    _ntt = None


def available() -> bool:
    return _ntt is not None


def _bitrev(x: int, bits: int) -> int:
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


def _primitive_2n_root(q: int, n: int) -> int:
    """SEAL's psi (``try_minimal_primitive_root``): the smallest primitive 2N-th root of unity mod q,
    so that our NTT form is SEAL's, word for word (its Galois keys are stored in it: he/hoist.py)."""
    if (q - 1) % (2 * n):
        raise ValueError(f"prime {q} is not 1 mod 2N = {2 * n}: no negacyclic NTT")
    for g in range(2, 1 << 16):
        root = pow(g, (q - 1) // (2 * n), q)
        if pow(root, n, q) == q - 1:
            break
    else:
        raise ValueError(f"no primitive 2N-th root of unity found mod {q}")
    best, sq, cur = root, root * root % q, root
    for _ in range(n):  # the primitive 2N-th roots are root^odd
        best, cur = min(best, cur), cur * sq % q
    return best


@dataclass(frozen=True)
class Tables:
    n: int
    qs: np.ndarray  # (k,) uint64
    tables: np.ndarray  # (k, 4, n): psi^bitrev, Shoup, psi^-bitrev, Shoup
    ninv: np.ndarray  # (k, 2): N^-1 mod q and its Shoup quotient
    ratios: np.ndarray  # (k, 2): floor(2^128 / q) as (high, low)
    t: int

    @property
    def k(self) -> int:
        return len(self.qs)


def barrett_ratios(primes) -> np.ndarray:
    """(k, 2) uint64: floor(2^128 / q) as (high, low) words, per prime (the C kernels' Barrett constant)."""
    return np.array([divmod((1 << 128) // int(q), 1 << 64) for q in primes], np.uint64)


@lru_cache(maxsize=8)
def tables(n: int, primes: tuple[int, ...], t: int) -> Tables:
    """Twiddle tables for the data-level primes (a pure function of public parameters)."""
    bits = n.bit_length() - 1
    if 1 << bits != n:
        raise ValueError(f"ring degree {n} is not a power of two")
    tab = np.empty((len(primes), 4, n), np.uint64)
    ninv, ratios = np.empty((len(primes), 2), np.uint64), np.empty((len(primes), 2), np.uint64)
    for i, q in enumerate(primes):
        if q >= 1 << 61:
            raise ValueError(f"prime {q} too wide for the lazy NTT (needs < 2^61)")
        psi = _primitive_2n_root(q, n)
        ipsi = pow(psi, -1, q)
        pw, ipw = [1] * n, [1] * n
        for j in range(1, n):
            pw[j], ipw[j] = pw[j - 1] * psi % q, ipw[j - 1] * ipsi % q
        order = [_bitrev(j, bits) for j in range(n)]
        w = [pw[r] for r in order]
        iw = [ipw[r] for r in order]
        tab[i, 0] = w
        tab[i, 1] = [(x << 64) // q for x in w]
        tab[i, 2] = iw
        tab[i, 3] = [(x << 64) // q for x in iw]
        ni = pow(n, -1, q)
        ninv[i] = (ni, (ni << 64) // q)
        ratios[i] = barrett_ratios((q,))[0]
    return Tables(n, np.array(primes, np.uint64), tab, ninv, ratios, int(t))


def forward(tb: Tables, words: np.ndarray) -> np.ndarray:
    """(..., k, n) residues (C-contiguous) -> NTT form, in place (k <= the tables' primes: the first k)."""
    k, n = words.shape[-2:]  # the tables' first k rows: leading-axis slices stay contiguous, no copy
    _ntt.forward(words, tb.tables[:k], tb.qs[:k], words.size // (k * n), k, n)
    return words


def inverse(tb: Tables, words: np.ndarray) -> np.ndarray:
    k, n = words.shape[-2:]
    _ntt.inverse(words, tb.tables[:k], tb.qs[:k], tb.ninv[:k], words.size // (k * n), k, n)
    return words


def mac(tb: Tables, babies: np.ndarray, pts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """babies (nb, size, k, n) and pts (terms, k, n) in NTT form -> sum_t babies[idx[t]] * pts[t]."""
    nb, size, k, n = babies.shape
    out = np.empty((size, k, n), np.uint64)
    _ntt.mac(out, babies, pts if pts.shape[1] == k else np.ascontiguousarray(pts[:, :k]),
             np.ascontiguousarray(idx, np.int64), tb.ratios[:k], tb.qs[:k], nb, len(idx), size, k, n)
    return out


def plain_ntt(tb: Tables, coeffs: np.ndarray) -> np.ndarray:
    """BFV plaintexts' coefficients (..., n) in [0, t) -> (..., k, n) NTT form, lifted as SEAL lifts them."""
    c = np.asarray(coeffs, np.uint64)
    upper = c >= np.uint64((tb.t + 1) // 2)
    words = np.empty(c.shape[:-1] + (tb.k, tb.n), np.uint64)
    for i, q in enumerate(tb.qs):
        words[..., i, :] = np.where(upper, c + (q - np.uint64(tb.t)), c)
    return forward(tb, words)


def plain_coeffs(pt, n: int) -> np.ndarray:
    """The n coefficients of a SEAL (non-NTT) plaintext, from its uncompressed bytes."""
    raw = pt.to_bytes("none")
    if len(raw) != PLAIN_PREFIX + 8 * n:
        raise SerializationError(f"plaintext: {len(raw)} bytes, expected {n} coefficients")
    return np.frombuffer(raw, np.uint64, offset=PLAIN_PREFIX).copy()


def ct_words(ct) -> tuple[bytes, np.ndarray]:
    """A 2-polynomial coefficient-form ciphertext -> (its SEAL prefix, a read-only (2, k, n) view of its words)."""
    raw = ct.to_bytes("none")
    head = read_prefix(raw)
    if head["ntt"] or head["size"] != 2:
        raise SerializationError("ciphertext: expected a 2-polynomial coefficient-form SEAL ciphertext")
    return raw[:PREFIX], np.frombuffer(raw, np.uint64, offset=PREFIX).reshape(2, head["k"], head["n"])


def ct_from_words(he, prefix: bytes, words: np.ndarray):
    """A coefficient-form SEAL ciphertext of ``words`` (size, k, n), ``prefix`` from any ciphertext at
    its level (the size fields are rewritten: a 3-polynomial product takes a 2-polynomial's prefix)."""
    size, k, n = words.shape
    count = size * k * n
    head = bytearray(prefix)
    struct.pack_into("<Q", head, 8, PREFIX + 8 * count)  # the SEAL header's total size
    struct.pack_into("<Q", head, 49, size)  # after the header (16), parms_id (32), is_ntt_form (1)
    struct.pack_into("<QQ", head, PREFIX - 16, 24 + 8 * count, count)  # the data array's total and count
    return PyCtxt(pyfhel=he, bytestring=bytes(head) + np.ascontiguousarray(words, np.uint64).tobytes())
