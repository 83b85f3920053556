"""The dealer's distributed comparison function (mpc/dcf.py) against [x < alpha], exactly."""
import numpy as np
from hypothesis import given, settings, strategies as st

from cryptogen.field import DEFAULT_T
from cryptogen.mpc import dcf

T, L = DEFAULT_T, 42


def _check(alpha, x, rng):
    beta = rng.integers(0, T, (len(alpha), dcf.OUT))
    k0, k1 = dcf.gen(alpha, beta, L, T)
    assert k0.shape == (len(alpha), dcf.key_words(L))
    out = np.mod(dcf.eval_(0, k0, x, L, T) + dcf.eval_(1, k1, x, L, T), T)
    want = np.where((x < alpha)[:, None], beta, 0)
    assert np.array_equal(out, want)


def test_dcf_edges_and_random_points():
    rng = np.random.default_rng(3)
    alpha = rng.integers(0, T, 3000)
    alpha[:4] = [0, 1, T - 1, 1 << 41]
    off = np.concatenate([np.zeros(1000), -np.ones(1000), np.ones(1000)]).astype(np.int64)
    x = np.clip(alpha + off, 0, (1 << L) - 1)
    x[3000 - 500:] = rng.integers(0, T, 500)
    _check(alpha, x, rng)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, T - 1), st.integers(0, T - 1)), min_size=1, max_size=40))
def test_dcf_property(pairs):
    a = np.array([p[0] for p in pairs], np.int64)
    x = np.array([p[1] for p in pairs], np.int64)
    _check(a, x, np.random.default_rng(len(pairs)))


def test_one_key_alone_looks_uniform():
    """A party's key words for two very different alphas are indistinguishable by their bits
    (each bit of the value correction words near 1/2), and its share of the output at a fixed x
    is spread over Z_t whatever [x < alpha] is."""
    rng = np.random.default_rng(4)
    n = 4000
    for alpha in (np.zeros(n, np.int64), np.full(n, T - 1, np.int64)):
        beta = np.tile([1, 1], (n, 1))
        k0, _ = dcf.gen(alpha, beta, L, T)
        y = dcf.eval_(0, k0, np.full(n, T // 2, np.int64), L, T)[:, 0]
        assert abs(y.mean() / T - 0.5) < 0.02  # uniform mean 1/2 +- ~4.5 sigma
        seeds = k0[:, :2].view(np.uint64)
        frac = np.unpackbits(seeds.view(np.uint8)).mean()
        assert abs(frac - 0.5) < 0.01 or abs(frac - (127 / 256)) < 0.01  # low bit of a seed is 0
