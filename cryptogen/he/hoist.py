"""Hoisted rotations: the baby steps of a linear layer share one key-switch decomposition
(Halevi & Shoup, "Faster Homomorphic Linear Transformations in HElib", CRYPTO 2018, section 5;
issue #11, "HE kernels at the floor").

A BFV row rotation by step s (SEAL's ``rotate_rows``, Galois element g = 3^s mod 2N) of x = (c0, c1)
is (sigma_g(c0), 0) + KeySwitch_g(sigma_g(c1)). SEAL's key switch cuts its input into its L RNS
digits d_j = [c1]_{q_j}, lifts each to the L data primes and the special prime p (L(L+1) NTTs),
multiplies by the Galois key and divides by p. sigma_g permutes the coefficients with signs, so the
digits of sigma_g(c1) are sigma_g of the digits of c1 (a negated digit is the integer -d_j rather than
q_j - d_j: they differ by q_j, which the key's gadget factor maps to a multiple of Q*p, i.e. to 0, and
|d_j| < q_j either way, so the noise bound ``NoiseModel.key_switch`` holds unchanged); and in the NTT
domain sigma_g is a permutation pi_g of the evaluation points. So rot(x, s) for many s costs:

  1. once per input (``decompose``): c1's digits lifted to all L+1 primes and NTT'd, L(L+1) NTTs, and
     c0 NTT'd, L NTTs;
  2. per step (``rotate``): acc_k = sum_j D_j * K'_{j,k} for k = 0, 1, the key pre-permuted at load,
     K' = pi_g^-1(K) (``GaloisKey``), 2L(L+1) products per coefficient (``ntt.mac``);
  3. the mod-down by p in the NTT domain, one inverse NTT mod p and L forward NTTs per polynomial,
     plus NTT(c0), then pi_g (``_ntt.moddown``): rot(x, s) in NTT form, what the giant step's
     multiply-accumulate takes (he/linear.py). SEAL's rotation costs L(L+1) + 2L + 2 NTTs and our
     forward NTT of its output 2L more; a hoisted one 2L + 2.

The result decrypts to exactly what SEAL's rotation does; its noise differs, within the same bound
(tests/he/test_hoist.py). The NTT is SEAL's (same psi, same order: he/ntt.py), so SEAL's Galois keys
are used as they are stored.
Who learns what: nothing new. The server applies the client's public Galois keys to ciphertexts it
already holds; every step's control flow depends only on public sizes.
A giant step's rotations are summed before one mod-down (``giant_sum``): see there.
Cost (N = 16384, L = 4, this machine; docs/BENCHMARKS.md "Hoisted baby steps"): decomposition
~4.5 ms per input, ~3.4 ms per hoisted step, against ~7 ms for SEAL's rotation and ~1.4 ms for
the forward NTTs of its result (``scripts/bench_he_floor.py`` measures them side by side).
Memory: one key per prepared step, 2L(L+1)N words (5.2 MB): steps 1..HOIST_STEPS-1, and the giant
steps a worker asks for when a context loads (``PublicContext.from_bytes(.., giant_steps)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import ntt, threads

# Steps 1..HOIST_STEPS-1 (the decode baby steps: linear.plan_linear keeps g1 <= HOIST_STEPS) get a
# prepared key when a public context loads; other steps rotate through SEAL.
HOIST_STEPS = 16


@lru_cache(maxsize=64)
def galois_permutation(n: int, elt: int) -> np.ndarray:
    """pi with NTT(sigma_elt(f))[j] = NTT(f)[pi[j]]: slot j evaluates at psi^(2 bitrev(j) + 1)."""
    bits = n.bit_length() - 1
    br = np.array([ntt._bitrev(j, bits) for j in range(n)], np.int64)
    slot = np.empty(n, np.int64)
    slot[br] = np.arange(n)
    perm = slot[((2 * br + 1) * elt % (2 * n) - 1) // 2]
    perm.flags.writeable = False
    return perm


@dataclass(frozen=True)
class GaloisKey:
    """One step's Galois key: words (2, L, L+1, n), key part k of digit j; for a hoisted baby step
    pre-permuted (pi^-1 applied: ``rotate`` permutes once, at the mod-down), for a giant step as
    SEAL stores it (``giant_sum`` permutes the digits instead)."""

    perm: np.ndarray
    words: np.ndarray
    stack: np.ndarray | None = None  # giant steps: (2, G L, 1, L+1, n), every giant key's digits (``stack_keys``)
    row: int = 0  # this key's first row in ``stack``


def stack_keys(keys: dict) -> dict:
    """Giant steps' keys (step -> GaloisKey) laid out in one array per key part, each key's words a view
    of its rows (no extra memory): ``giant_sum`` multiplies all of an output's terms in one call."""
    if not keys:
        return {}
    steps = sorted(keys)
    _two, L, k, n = keys[steps[0]].words.shape
    stack = np.empty((2, len(steps) * L, 1, k, n), np.uint64)
    out = {}
    for g, s in enumerate(steps):
        stack[:, g * L:(g + 1) * L, 0] = keys[s].words
        out[s] = GaloisKey(keys[s].perm, stack[:, g * L:(g + 1) * L, 0], stack, g * L)
    return out


def prepare_key(n: int, elt: int, key: np.ndarray, prepermute: bool = True) -> GaloisKey:
    """``key``: SEAL's words (L digits, 2, L+1, n), NTT form (serialize.seal_galois_key_words)."""
    perm = galois_permutation(n, elt)
    if prepermute:
        inv = np.empty(n, np.int64)
        inv[perm] = np.arange(n)
        key = key[..., inv]
    return GaloisKey(perm, np.ascontiguousarray(key.transpose(1, 0, 2, 3)))


@dataclass(frozen=True)
class Decomposed:
    """One input's shared part: c0 in NTT form (L, n) and c1's digits on all primes (L, 1, L+1, n)."""

    c0: np.ndarray
    digits: np.ndarray

    def identity(self) -> np.ndarray:
        """The input itself in NTT form (2, L, n): c1's digit j on prime j is c1 mod q_j."""
        L = self.c0.shape[0]
        return np.stack([self.c0, self.digits[np.arange(L), 0, np.arange(L)]])


@lru_cache(maxsize=4)
def _identity(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


@lru_cache(maxsize=8)
def _constants(qs: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    p, L = qs[-1], len(qs) - 1
    pinv = np.array([[w := pow(p, -1, q), (w << 64) // q] for q in qs[:L]], np.uint64)
    return pinv, np.arange(L, dtype=np.int64)


def decompose(tb: ntt.Tables, words: np.ndarray) -> Decomposed:
    """Step 1. ``tb``: tables of all L+1 primes (special last); ``words``: (2, L, n) coefficient form."""
    L, n = words.shape[1:]
    c0 = ntt.forward(tb, np.array(words[0]))
    return Decomposed(c0, _digits(tb, np.ascontiguousarray(words[1]), _identity(n)))


def _digits(tb: ntt.Tables, c1: np.ndarray, perm: np.ndarray, c1_ntt: np.ndarray | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
    """pi(NTT_i(c1[j] mod q_i)) for the digits j of coefficient-form c1 (L, n): (L, 1, L+1, n);
    ``c1_ntt``: c1 in NTT form, if at hand (its rows are the digits on their own primes); ``out``:
    a C-contiguous (L, 1, L+1, n) array to write them into."""
    L, n = c1.shape
    out = np.empty((L, 1, L + 1, n), np.uint64) if out is None else out
    ntt._ntt.digits(out, c1, b"" if c1_ntt is None else np.ascontiguousarray(c1_ntt), perm, tb.tables, tb.qs,
                    tb.ratios, L, n)
    return out


def rotate_many(tb: ntt.Tables, d: Decomposed, keys: list[GaloisKey]) -> list[np.ndarray]:
    """[rotate(tb, d, key) for key in keys], on the HE threads (he/threads.py: each step's kernels
    release the GIL and write only their own output)."""
    return threads.map_tasks(lambda key: rotate(tb, d, key), keys)


def rotate(tb: ntt.Tables, d: Decomposed, key: GaloisKey) -> np.ndarray:
    """Steps 2-3: the rotated ciphertext's (2, L, n) words in NTT form (over the data primes)."""
    L, _one, k, n = d.digits.shape
    pinv, idx = _constants(tuple(int(q) for q in tb.qs))
    acc = np.empty((2, k, n), np.uint64)
    for part in range(2):
        ntt._ntt.mac(acc[part], d.digits, key.words[part], idx, tb.ratios, tb.qs, L, L, 1, k, n)
    out = np.empty((2, L, n), np.uint64)
    ntt._ntt.moddown(out, acc, d.c0, key.perm, tb.tables, tb.qs, tb.ninv, tb.ratios, pinv, L, n)
    return out


# ---- giant steps: many rotations summed, one mod-down (Bossuat et al., Eurocrypt 2021) --------
def _addmod(acc: np.ndarray, x: np.ndarray, qs: np.ndarray) -> None:
    """acc += x mod q, in place; acc, x < q (q along the second-to-last axis)."""
    acc += x
    q = qs.reshape((-1, 1))
    np.subtract(acc, q, out=acc, where=acc >= q)


def giant_sum(tb: ntt.Tables, terms: list) -> np.ndarray:
    """sum_b rot(Z_b, s_b) for NTT-form Z_b (2, L, n); ``terms``: (Z_b, its GaloisKey, not pre-permuted, or None for step 0).
    Each rotated term's key switch is accumulated over Q*p -- c1's digits (one inverse NTT per prime,
    then lifted and NTT'd as in ``decompose``), permuted by pi, times the key -- and the sum is divided
    by p once (``_ntt.moddown``), with sum_b pi_b(c0_b) added after. Rounding once instead of per
    term only lowers the noise; the bound counts a key switch per term."""
    L, n = terms[0][0].shape[1:]
    k = L + 1
    pinv, idx = _constants(tuple(int(q) for q in tb.qs))
    switched = [(z, key) for z, key in terms if key is not None]
    if switched and all(key.stack is not None and key.stack is switched[0][1].stack for _z, key in switched):
        return _giant_sum_stacked(tb, terms, switched, pinv)
    plain = np.zeros((2, L, n), np.uint64)
    acc = np.zeros((2, k, n), np.uint64)
    c0 = np.zeros((L, n), np.uint64)
    part = np.empty((k, n), np.uint64)
    switched = False
    for z, key in terms:
        if key is None:
            _addmod(plain, z, tb.qs[:L])
            continue
        switched = True
        digits = _digits(tb, ntt.inverse(tb, np.array(z[1])), key.perm, z[1])  # pi(D_j)
        for p in range(2):
            ntt._ntt.mac(part, digits, key.words[p], idx, tb.ratios, tb.qs, L, L, 1, k, n)
            _addmod(acc[p], part, tb.qs)
        _addmod(c0, z[0][:, key.perm], tb.qs[:L])
    if switched:
        out = np.empty((2, L, n), np.uint64)
        ntt._ntt.moddown(out, acc, c0, _identity(n), tb.tables, tb.qs, tb.ninv, tb.ratios, pinv, L, n)
        _addmod(plain, out, tb.qs[:L])
    return plain


def _giant_sum_stacked(tb: ntt.Tables, terms: list, switched: list, pinv: np.ndarray) -> np.ndarray:
    """``giant_sum`` with every term's key in one stack (``stack_keys``): the terms' digits made on the HE
    threads (each into its own rows), then per key part one multiply-accumulate over all of them against
    their keys' rows, and sum_b pi_b(c0_b) summed unreduced (each < 2^61, fewer than 2^3 terms a word's
    headroom allows per reduction) and reduced before the one mod-down. The same words as the loop."""
    L, n = terms[0][0].shape[1:]
    k, B = L + 1, len(switched)
    digits = np.empty((B * L, 1, k, n), np.uint64)

    def fill(b: int) -> None:
        z, key = switched[b]
        _digits(tb, ntt.inverse(tb, np.array(z[1])), key.perm, z[1], digits[b * L:(b + 1) * L])
    threads.map_tasks(fill, range(B))
    stack = switched[0][1].stack
    rows = np.concatenate([key.row + np.arange(L) for _z, key in switched]).astype(np.int64)
    acc = np.empty((2, k, n), np.uint64)
    flat = digits.reshape(B * L, k, n)

    def part(p: int) -> None:
        ntt._ntt.mac(acc[p], stack[p], flat, rows, tb.ratios, tb.qs, stack.shape[1], B * L, 1, k, n)
    threads.map_tasks(part, [0, 1])
    qs = tb.qs[:L, None]
    c0 = np.zeros((L, n), np.uint64)
    for b, (z, key) in enumerate(switched):
        c0 += z[0][:, key.perm]
        if b % 7 == 6:
            np.mod(c0, qs, out=c0)
    np.mod(c0, qs, out=c0)
    out = np.empty((2, L, n), np.uint64)
    ntt._ntt.moddown(out, acc, c0, _identity(n), tb.tables, tb.qs, tb.ninv, tb.ratios, pinv, L, n)
    for z, key in terms:
        if key is None:
            _addmod(out, z, tb.qs[:L])
    return out
