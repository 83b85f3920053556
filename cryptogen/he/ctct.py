"""BFV ciphertext x ciphertext by hand, each operand's base extension done once (issue #11: the q.K
and p.V products over the encrypted KV cache, ``he/arcc.py``).

Construction: Halevi, Polyakov, Shoup, "An Improved RNS Variant of the BFV Homomorphic Encryption
Scheme" (CT-RSA 2019), section 4, in 64.64 and 64.128 fixed point instead of floating point (SEAL runs
Bajard et al.'s variant; both compute round(t/Q * a (x) b) over the integers). For a = (a0, a1) and
b = (b0, b1) under the data primes Q = q_1..q_L:
  1. ``prepare`` (``_ctct.extend``, then NTTs): each operand's centred coefficients extended to
     Q u P, P = p_1..p_K auxiliary 60-bit primes with P > 2^8 t N Q (so MAX_PAIRS summed products
     and their scaled value fit), then NTT'd over all L+K primes. Once per operand, whatever it is
     multiplied with: the query once for all the K ciphertexts; a cache ciphertext once for all the
     tokens that read it (the engine keeps it on the Cipher, ``ServerEngine.keep_prepared``).
     The centred lift's v = round(sum_i a~_i / q_i) is exact unless a coefficient lies within 2^-62 Q
     of +-Q/2; it is then lifted to a + Q, which adds t (Q mod t) m_b + t e_b (below t^2 N), far below
     Delta = Q/t, to the product's noise (HPS section 4; the kernel never depends on the values);
  2. ``product`` (``_ctct.tensor``): the tensor (a0 b0, a0 b1 + a1 b0, a1 b1) element-wise, summed
     over the pairs (128-bit sums, one reduction: p.V sums its products before any scaling);
  3. 3(L+K) inverse NTTs;
  4. (``_ctct.scale``) y = round(t x / Q) in P, the fractional sum to 2^-63, then y exactly back to Q
     (|y| < P/2): a 3-polynomial SEAL ciphertext, which SEAL relinearises (q.K) or the export does
     once for the sum (p.V).
Who learns what: nothing new; the server multiplies ciphertexts it already holds, with public
constants, with control flow that depends on public sizes only. The result decrypts to SEAL's
``multiply`` (tests/he/test_ctct.py: word for word against a Python-integer reference, decrypt-equal
to SEAL at the real parameters, measured noise budget within a bit of SEAL's).
Cost (N = 16384, L = 4, K = 5; docs/BENCHMARKS.md "ct x ct by hand"): preparing an operand ~5 ms
(extension 1.7, 18 NTTs 3.1); a product ~15 ms (tensor 2.4 per pair, 27 inverse NTTs 5.4, scaling
7); SEAL's multiply ~27 ms, with nothing shared between products.
Memory: a prepared operand is 2(L+K)N words (2.4 MB at N = 16384), 2.25x its ciphertext, kept on the
cache ciphertexts while they live.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod

import numpy as np

from . import ntt

try:  # built by ``pip install -e .`` (setup.py); bin/bootstrap always does
    from . import _ctct
except ImportError:  # pragma: no cover - a checkout without the build step
    _ctct = None

MAX_PAIRS = 64  # products summed in one ``product`` (128-bit sums: 2 * 64 products of < 2^120)
_P_BITS = 60


def available() -> bool:
    return _ctct is not None and ntt.available()


def _aux_primes(n: int, avoid: tuple[int, ...], need_bits: int) -> tuple[int, ...]:
    """The largest 60-bit primes = 1 mod 2n, not in ``avoid``, until their product has need_bits."""
    from .params import _is_prime
    out, c = [], ((1 << _P_BITS) - 1) // (2 * n) * (2 * n) + 1
    while prod(out, start=1).bit_length() <= need_bits:
        c -= 2 * n
        if c.bit_length() < _P_BITS:
            raise ValueError(f"not enough {_P_BITS}-bit primes = 1 mod {2 * n}")
        if c not in avoid and _is_prime(c):
            out.append(c)
    return tuple(out)


def _u64(xs) -> np.ndarray:
    return np.array([int(x) for x in xs], np.uint64)


def _shoup(ws, ms) -> np.ndarray:
    """(k, 2): w mod m and floor(w * 2^64 / m)."""
    return np.array([(w % m, ((w % m) << 64) // m) for w, m in zip(ws, ms)], np.uint64)


@dataclass(frozen=True)
class Basis:
    """Public constants for Q = ``qs`` and the auxiliary P = ``ps`` (a pure function of the parameters)."""
    n: int
    qs: tuple[int, ...]
    ps: tuple[int, ...]
    t: int
    tb: ntt.Tables  # NTT tables over Q u P
    ext: tuple  # extend's constants
    sc: tuple  # scale's constants

    @property
    def L(self) -> int:
        return len(self.qs)

    @property
    def K(self) -> int:
        return len(self.ps)


@lru_cache(maxsize=8)
def basis(n: int, qs: tuple[int, ...], t: int, avoid: tuple[int, ...] = ()) -> Basis:
    qs = tuple(int(q) for q in qs)
    Q = prod(qs)
    ps = _aux_primes(n, tuple(qs) + tuple(avoid), Q.bit_length() + t.bit_length() + n.bit_length() + 8)
    P, M = prod(ps), Q * prod(ps)
    ext = (_u64(qs), _shoup([pow(Q // q, -1, q) for q in qs], qs), ntt.barrett_ratios(qs), _u64(ps), ntt.barrett_ratios(ps),
           _u64([Q // q % p for q in qs for p in ps]), _u64([-Q % p for p in ps]))
    phinv = [pow(P // p, -1, p) for p in ps]
    sc = (_u64(qs), _u64(ps), _shoup([pow(M // q, -1, q) for q in qs], qs),
          np.array([divmod((t * P % q << 128) // q, 1 << 64) for q in qs], np.uint64),  # r_i / q_i, 64.128
          _u64([t * P // q * h % p for q in qs for p, h in zip(ps, phinv)]),  # I_i (P/p_j)^-1
          _u64([t * P // p * pow(M // p, -1, p) * h % p for p, h in zip(ps, phinv)]),  # tP/p_j (QP/p_j)^-1 (P/p_j)^-1
          _u64(phinv), ntt.barrett_ratios(ps), _u64([P // p % q for p in ps for q in qs]), _u64([-P % q for q in qs]),
          ntt.barrett_ratios(qs))
    return Basis(n, qs, ps, int(t), ntt.tables(n, qs + ps, int(t)), ext, sc)


def prepare(b: Basis, words: np.ndarray) -> np.ndarray:
    """Step 1: a (2, L, n) coefficient-form ciphertext -> (2, L+K, n) over Q u P in NTT form."""
    x = np.ascontiguousarray(words, np.uint64)
    size, L, n = x.shape
    if L != b.L or n != b.n:
        raise ValueError(f"ct x ct: a ciphertext of {L} primes and degree {n}, the basis has {b.L} and {b.n}")
    out = np.empty((size, b.L + b.K, n), np.uint64)
    _ctct.extend(out, x, *b.ext, size, b.L, b.K, n)
    return ntt.forward(b.tb, out)


def product(b: Basis, lefts: list[np.ndarray], rights: list[np.ndarray]) -> np.ndarray:
    """Steps 3-6: sum_c lefts[c] (x) rights[c] (prepared operands) -> (3, L, n) coefficient-form
    words of round(t/Q * sum), the 3-polynomial product (or sum of products) under Q."""
    if not lefts or len(lefts) != len(rights) or len(lefts) > MAX_PAIRS:
        raise ValueError(f"ct x ct: 1..{MAX_PAIRS} pairs of prepared operands, got {len(lefts)} and {len(rights)}")
    M, n = b.L + b.K, b.n
    x = np.empty((3, M, n), np.uint64)
    _ctct.tensor(x, list(lefts), list(rights), b.tb.qs, b.tb.ratios, M, n)
    ntt.inverse(b.tb, x)
    out = np.empty((3, b.L, n), np.uint64)
    _ctct.scale(out, x, *b.sc, 3, b.L, b.K, n)
    return out
