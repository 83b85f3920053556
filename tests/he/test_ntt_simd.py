"""The NTT's AVX-512 stages (he/_ntt_rows.h) against the scalar stages and against Python integers:
word for word, over the lazy input ranges the kernels hand each other (forward: < 4q, inverse: < 2q)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.he import ntt
from cryptogen.he.ntt import _ntt
from cryptogen.he.params import _seal_primes

from test_ntt import _negacyclic

# primes = 1 mod 2n as SEAL picks them: a small one, a 54-bit data prime, a 60-bit special prime
PRIMES = {n: _seal_primes(n, (30, 54, 60)) for n in (64, 1024, 16384)}


@pytest.fixture(scope="module")
def simd_switch():
    """Yields set(on); restores the setting after the module; skips where the CPU has no AVX-512."""
    was = _ntt.simd()
    try:
        _ntt.set_simd(True)
    except ValueError:
        pytest.skip("this CPU has no AVX-512F/DQ")
    yield _ntt.set_simd
    _ntt.set_simd(was)


def _both(simd_switch, fn, data):
    out = {}
    for on in (True, False):
        simd_switch(on)
        out[on] = fn(data.copy())
    return out[True], out[False]


@pytest.mark.parametrize("n", sorted(PRIMES))
def test_simd_stages_equal_the_scalar_ones_word_for_word(simd_switch, n):
    """Random residues across the whole lazy range and the extremes (0, q - 1, 4q - 1 / 2q - 1),
    for forward and inverse; both paths end reduced to [0, q), so they must agree exactly."""
    primes = PRIMES[n]
    tb = ntt.tables(n, tuple(primes), 17)
    qs = np.array(primes, np.uint64)[:, None]
    rng = np.random.default_rng(n)
    for bound, fn in ((4, lambda w: ntt.forward(tb, w)), (2, lambda w: ntt.inverse(tb, w))):
        words = np.stack([np.stack([rng.integers(0, bound * int(q), n, dtype=np.uint64) for q in primes])
                          for _ in range(3)])
        words[1] = bound * qs - np.uint64(1)
        words[2, :, ::2] = 0
        a, b = _both(simd_switch, fn, words)
        assert np.array_equal(a, b)
        assert (a < qs).all()
    reduced = np.stack([rng.integers(0, int(q), n, dtype=np.uint64) for q in primes])[None]
    simd_switch(True)
    assert np.array_equal(ntt.inverse(tb, ntt.forward(tb, reduced.copy())), reduced)  # the round trip


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_simd_products_equal_python_negacyclic_products(simd_switch, seed, extreme):
    """inverse(forward(x) * forward(w)) = x * w in Z_q[X]/(X^64 + 1) with the vector stages on
    (at n = 64 three stages of each transform are vectorised, three stay scalar)."""
    simd_switch(True)
    n, primes = 64, PRIMES[64]
    tb = ntt.tables(n, primes, 17)
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])[None]
    w = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])[None]
    if extreme:
        x[:] = np.array(primes, np.uint64)[None, :, None] - np.uint64(1)
        w[:] = x
    want = np.stack([_negacyclic([int(v) for v in x[0, i]], [int(v) for v in w[0, i]], q)
                     for i, q in enumerate(primes)]).astype(np.uint64)
    got = ntt.inverse(tb, ntt.mac(tb, ntt.forward(tb, x.copy())[:, None], ntt.forward(tb, w.copy()), np.arange(1)))
    assert np.array_equal(got[0], want)


def test_switch_reports_and_restores(simd_switch):
    simd_switch(True)
    assert simd_switch(False) is True
    assert _ntt.simd() is False
    assert simd_switch(True) is False


@pytest.mark.parametrize("galois", [False, True])
def test_key_switch_steps_equal_the_scalar_ones_word_for_word(simd_switch, galois):
    """A key switch's two ends (``_ntt.digits``, ``_ntt.moddown``: the reductions, the division by the
    special prime, the Galois permutation or none) with the vector stages and without, at N = 16384."""
    from cryptogen.he import hoist
    n, primes = 16384, _seal_primes(16384, (54, 54, 54, 60))
    L, k = len(primes) - 1, len(primes)
    tb = ntt.tables(n, primes, 17)
    pinv, _idx = hoist._constants(primes)
    perm = hoist.galois_permutation(n, 3) if galois else np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(7)
    c1 = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes[:L]])
    acc = np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes]) for _ in range(2)])
    acc[1, :, :64] = np.array(primes, np.uint64)[:, None] - np.uint64(1)
    c0 = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes[:L]])

    def digits(c):
        out = np.empty((L, 1, k, n), np.uint64)
        _ntt.digits(out, c, b"", perm, tb.tables, tb.qs, tb.ratios, L, n)
        return out

    def moddown(a):
        out = np.empty((2, L, n), np.uint64)
        _ntt.moddown(out, a, c0, perm, tb.tables, tb.qs, tb.ninv, tb.ratios, pinv, L, n)
        return out
    for fn, data in ((digits, c1), (moddown, acc)):
        a, b = _both(simd_switch, fn, data)
        assert np.array_equal(a, b)
