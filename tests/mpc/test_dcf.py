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


def _eval_reference(b, key, x, L, t):
    """BCG+21 Fig. 1 evaluation as written, one reduction per level: the specification that
    ``dcf.eval_`` (limb sums, one reduction at the end) must match share for share."""
    n = len(key)
    s = key[:, :2].view(np.uint64).copy()
    scw = key[:, 2:2 + 2 * L].view(np.uint64).reshape(n, L, 2)
    vcw = key[:, 2 + 2 * L:2 + 4 * L].reshape(n, L, dcf.OUT)
    tcw = key[:, 2 + 4 * L:2 + 5 * L]
    cw_last = key[:, 2 + 5 * L:]
    tt = np.full(n, b, np.int64)
    V = np.zeros((n, dcf.OUT), np.int64)
    for i in range(L):
        side = (x >> (L - 1 - i)) & 1
        blocks = np.stack([side, 2 + side * dcf.OUT, 3 + side * dcf.OUT], 1).astype(np.uint64)  # OUT = 2
        xi = np.repeat(s[:, None, :], 3, 1)
        xi[:, :, 0] ^= blocks
        y = dcf._aes(xi) ^ xi
        tn = (y[:, 0, 0] & np.uint64(1)).astype(np.int64)
        sn = y[:, 0].copy()
        sn[:, 0] &= ~np.uint64(1)
        v = dcf._to_field(y[:, 1:, 0], y[:, 1:, 1], t)
        s = sn ^ (scw[:, i] * tt[:, None].astype(np.uint64))
        V = np.mod(V + v + tt[:, None] * vcw[:, i], t)
        tt = tn ^ (tt & ((tcw[:, i] >> side) & 1))
    V = np.mod(V + dcf._convert(s, t) + tt[:, None] * cw_last, t)
    return V if b == 0 else np.mod(-V, t)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 300), st.sampled_from([(42, T), (10, 1021), (20, (1 << 20) + 7)]), st.integers(0, 2**32))
def test_eval_equals_the_per_level_construction_share_for_share(n, shape, seed):
    L_, t = shape
    rng = np.random.default_rng(seed)
    alpha, x = rng.integers(0, min(t, 1 << L_), (2, n))
    x[: n // 3] = alpha[: n // 3]  # x = alpha: the path never leaves alpha's
    k = dcf.gen(alpha, rng.integers(0, t, (n, dcf.OUT)), L_, t)
    for b in (0, 1):
        assert np.array_equal(dcf.eval_(b, k[b], x, L_, t), _eval_reference(b, k[b], x, L_, t))


def test_batches_split_into_chunks_give_the_same_keys_and_shares(monkeypatch):
    """gen and eval_ work CHUNK items at a time: with CHUNK = 7 over 40 items (5 full chunks and a
    part) the keys still compare exactly, and one key set evaluates share for share the same in
    chunks as in one pass."""
    rng = np.random.default_rng(9)
    alpha, x = rng.integers(0, T, (2, 40))
    x[:10] = alpha[:10]
    k = dcf.gen(alpha, rng.integers(0, T, (40, dcf.OUT)), L, T)
    whole = [dcf.eval_(b, k[b], x, L, T) for b in (0, 1)]
    monkeypatch.setattr(dcf, "CHUNK", 7)
    assert all(np.array_equal(dcf.eval_(b, k[b], x, L, T), whole[b]) for b in (0, 1))
    _check(alpha, x, rng)
