"""The dealer's distributed comparison function (mpc/dcf.py) against [x < alpha], exactly; its
evaluation in C (mpc/_dcf.c) against the numpy evaluation and the per-level construction, share
for share."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cryptogen.field import DEFAULT_T
from cryptogen.mpc import dcf

T, L = DEFAULT_T, 42


def _check(alpha, x, rng, out=dcf.OUT):
    beta = rng.integers(0, T, (len(alpha), out))
    k0, k1 = dcf.gen(alpha, beta, L, T)
    assert k0.shape == (len(alpha), dcf.key_words(L, out)) and dcf.outputs(k0, L) == out
    got = np.mod(dcf.eval_(0, k0, x, L, T) + dcf.eval_(1, k1, x, L, T), T)
    want = np.where((x < alpha)[:, None], beta, 0)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("out", [1, 2])
def test_dcf_edges_and_random_points(out):
    rng = np.random.default_rng(3)
    alpha = rng.integers(0, T, 3000)
    alpha[:4] = [0, 1, T - 1, 1 << 41]
    off = np.concatenate([np.zeros(1000), -np.ones(1000), np.ones(1000)]).astype(np.int64)
    x = np.clip(alpha + off, 0, (1 << L) - 1)
    x[3000 - 500:] = rng.integers(0, T, 500)
    _check(alpha, x, rng, out)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, T - 1), st.integers(0, T - 1)), min_size=1, max_size=40), st.sampled_from([1, 2]))
def test_dcf_property(pairs, out):
    a = np.array([p[0] for p in pairs], np.int64)
    x = np.array([p[1] for p in pairs], np.int64)
    _check(a, x, np.random.default_rng(len(pairs)), out)


def test_key_sizes_and_bad_shapes():
    """174 words at L = 42 with two outputs, 131 with one (the t_CW bits packed in two words); a
    beta or a key of any other width is one clear line."""
    assert (dcf.key_words(42, 2), dcf.key_words(42, 1)) == (174, 131)
    with pytest.raises(ValueError, match=r"beta must be \(n,\) or \(n, 1 \| 2\) for n = 2 points, got shape \(2, 3\)"):
        dcf.gen(np.arange(2), np.ones((2, 3), np.int64), L, T)
    with pytest.raises(ValueError, match=r"DCF keys must be \(n, 131\) or \(n, 174\) int64 for L = 42, got shape \(2, 214\)"):
        dcf.eval_(0, np.zeros((2, 214), np.int64), np.zeros(2, np.int64), L, T)


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


def _eval_reference(b, key, x, L, t, out):
    """BCG+21 Fig. 1 evaluation as written, one reduction per level, the key laid out as
    ``dcf.key_words`` says: the specification that ``dcf.eval_`` (limb sums, one reduction at the
    end) must match share for share."""
    n = len(key)
    s = key[:, :2].view(np.uint64).copy()
    scw = key[:, 2:2 + 2 * L].view(np.uint64).reshape(n, L, 2)
    vcw = key[:, 2 + 2 * L:2 + (2 + out) * L].reshape(n, L, out)
    masks = key[:, 2 + (2 + out) * L:4 + (2 + out) * L]  # t_CW bits of side L, side R; bit i: level i
    cw_last = key[:, 4 + (2 + out) * L:]
    assert cw_last.shape == (n, out)
    tt = np.full(n, b, np.int64)
    V = np.zeros((n, out), np.int64)
    for i in range(L):
        side = (x >> (L - 1 - i)) & 1
        blocks = np.stack([side] + [2 + side * out + o for o in range(out)], 1).astype(np.uint64)
        xi = np.repeat(s[:, None, :], 1 + out, 1)
        xi[:, :, 0] ^= blocks
        y = dcf._aes(xi) ^ xi
        tn = (y[:, 0, 0] & np.uint64(1)).astype(np.int64)
        sn = y[:, 0].copy()
        sn[:, 0] &= ~np.uint64(1)
        v = dcf._to_field(y[:, 1:, 0], y[:, 1:, 1], t)
        s = sn ^ (scw[:, i] * tt[:, None].astype(np.uint64))
        V = np.mod(V + v + tt[:, None] * vcw[:, i], t)
        tcw = (np.where(side == 1, masks[:, 1], masks[:, 0]) >> i) & 1
        tt = tn ^ (tt & tcw)
    V = np.mod(V + dcf._convert(s, t, out) + tt[:, None] * cw_last, t)
    return V if b == 0 else np.mod(-V, t)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 300), st.sampled_from([(42, T), (10, 1021), (20, (1 << 20) + 7), (62, T)]),
       st.integers(0, 2**32), st.sampled_from([1, 2]))
def test_eval_equals_the_per_level_construction_share_for_share(n, shape, seed, out):
    """Both output counts; L = 62 puts a t_CW bit at the top of its mask word."""
    L_, t = shape
    rng = np.random.default_rng(seed)
    alpha, x = rng.integers(0, min(t, 1 << L_), (2, n))
    x[: n // 3] = alpha[: n // 3]  # x = alpha: the path never leaves alpha's
    k = dcf.gen(alpha, rng.integers(0, t, (n, out)), L_, t)
    for b in (0, 1):
        want = _eval_reference(b, k[b], x, L_, t, out)
        assert np.array_equal(dcf.eval_numpy(b, k[b], x, L_, t), want)
        assert np.array_equal(dcf.eval_(b, k[b], x, L_, t), want)  # the C kernel where the CPU has AES-NI


def test_batches_split_into_chunks_give_the_same_keys_and_shares(monkeypatch):
    """gen and eval_ work CHUNK items at a time: with CHUNK = 7 over 40 items (5 full chunks and a
    part) the keys still compare exactly, and one key set evaluates share for share the same in
    chunks as in one pass."""
    rng = np.random.default_rng(9)
    alpha, x = rng.integers(0, T, (2, 40))
    x[:10] = alpha[:10]
    k = dcf.gen(alpha, rng.integers(0, T, (40, dcf.OUT)), L, T)
    whole = [dcf.eval_numpy(b, k[b], x, L, T) for b in (0, 1)]
    monkeypatch.setattr(dcf, "CHUNK", 7)
    assert all(np.array_equal(dcf.eval_numpy(b, k[b], x, L, T), whole[b]) for b in (0, 1))
    _check(alpha, x, rng)


needs_kernel = pytest.mark.skipif(dcf._dcf is None or not dcf._dcf.aesni(), reason="no C kernel or no AES-NI")


def test_the_c_kernel_runs_where_the_cpu_has_aes_ni(monkeypatch):
    monkeypatch.delenv(dcf.KERNEL_ENV, raising=False)
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    assert dcf.kernel() == ("c" if " aes " in flags + " " else "numpy")


def test_kernel_choice(monkeypatch):
    """CRYPTOGEN_DCF_KERNEL=numpy runs the numpy evaluation (eval_numpy is not called otherwise); an
    unknown name, or c without the build, is one clear line; without the build the default is numpy."""
    from cryptogen.mpc.errors import ConfigError
    calls = []
    monkeypatch.setattr(dcf, "eval_numpy", lambda *a: calls.append(a) or np.zeros((0, dcf.OUT), np.int64))
    empty = np.zeros((0, dcf.key_words(L)), np.int64), np.zeros(0, np.int64)
    monkeypatch.setenv(dcf.KERNEL_ENV, "numpy")
    dcf.eval_(0, *empty, L, T)
    assert len(calls) == 1
    monkeypatch.setenv(dcf.KERNEL_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"CRYPTOGEN_DCF_KERNEL='gpu' is not a DCF kernel; choose one of c, numpy"):
        dcf.eval_(0, *empty, L, T)
    monkeypatch.setattr(dcf, "_dcf", None)
    monkeypatch.setenv(dcf.KERNEL_ENV, "c")
    with pytest.raises(ConfigError, match=r"needs the compiled kernel \(cryptogen/mpc/_dcf.c; run bin/bootstrap\)"):
        dcf.eval_(0, *empty, L, T)
    monkeypatch.delenv(dcf.KERNEL_ENV)
    assert dcf.kernel() == "numpy"


@needs_kernel
@settings(max_examples=10, deadline=None)
@given(st.integers(1, 300), st.sampled_from([(42, T), (10, 1021), (20, (1 << 20) + 7), (62, T)]),
       st.integers(0, 2**32), st.sampled_from([1, 2]))
def test_kernel_keys_equal_the_numpy_keys_word_for_word(n, shape, seed, out):
    """The C dealer's keys from given seeds are gen_numpy's from the same seeds (alpha at 0, 2^L - 1
    and random; beta random, with 0 and t - 1; one output and two)."""
    L_, t = shape
    rng = np.random.default_rng(seed)
    alpha = rng.integers(0, 1 << L_, n)
    alpha[:2] = [0, (1 << L_) - 1][:n]
    beta = rng.integers(0, t, (n, out))
    beta[0] = [0, t - 1][:out]
    seeds = rng.integers(0, 2**63, (2, n, 2), dtype=np.int64).view(np.uint64) ^ np.uint64(1)  # low bits flipped: both clear them
    k0, k1 = (np.zeros((n, dcf.key_words(L_, out)), np.int64) for _ in range(2))
    dcf._dcf.gen(k0, k1, alpha, beta, seeds, n, L_, t, out)
    want = dcf.gen_numpy(alpha, beta, L_, t, seeds)
    assert np.array_equal(k0, want[0]) and np.array_equal(k1, want[1])


@needs_kernel
def test_kernel_aes_equals_the_cryptography_library():
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 2**63, (1000, 2), dtype=np.int64).view(np.uint64)
    blocks[0] = 0
    out = np.empty_like(blocks)
    dcf._dcf.aes(out, blocks, len(blocks))
    assert np.array_equal(out, dcf._aes(blocks))


@needs_kernel
def test_kernel_shares_on_the_pool_sizes_of_a_decode_step():
    """1 and 4,097 items (a single truncation, more than a numpy chunk), x at 0, alpha and 2^L - 1:
    the C shares equal numpy's and reconstruct beta [x < alpha]; no items give no shares."""
    rng = np.random.default_rng(6)
    empty = np.zeros((0, dcf.key_words(L)), np.int64)
    assert dcf.eval_(0, empty, np.zeros(0, np.int64), L, T).shape == (0, dcf.OUT)
    for n in (1, 4097):
        alpha = rng.integers(0, 1 << L, n)
        x = rng.integers(0, 1 << L, n)
        x[: n // 4], x[n // 4: n // 2] = alpha[: n // 4], 0
        x[n // 2: n // 2 + 3] = (1 << L) - 1
        beta = rng.integers(0, T, (n, dcf.OUT))
        k = dcf.gen(alpha, beta, L, T)
        got = [dcf.eval_(b, k[b], x, L, T) for b in (0, 1)]
        assert all(np.array_equal(got[b], dcf.eval_numpy(b, k[b], x, L, T)) for b in (0, 1))
        assert np.array_equal(np.mod(got[0] + got[1], T), np.where((x < alpha)[:, None], beta, 0))


@needs_kernel
@pytest.mark.parametrize("bad, match", [
    (dict(x=-1), "outside"), (dict(x=1 << L), "outside"), (dict(words=-1), "keys has"),
    (dict(t=1 << 48), "bad parameters"), (dict(b=2), "bad parameters"), (dict(out_items=2), "output has"),
    (dict(words=-(L + 1)), "keys has")])  # a one-output key read as a two-output one
def test_kernel_rejects_bad_input_with_one_line(bad, match):
    rng = np.random.default_rng(7)
    k = dcf.gen(rng.integers(0, T, 3), rng.integers(0, T, (3, dcf.OUT)), L, T)[0]
    x = np.array([1, 2, bad.get("x", 3)], np.int64)
    key = k[:, :bad.get("words", 0) or None]
    out = np.zeros((bad.get("out_items", 3), dcf.OUT), np.int64)
    with pytest.raises(ValueError, match=match):
        dcf._dcf.eval(out, np.ascontiguousarray(key), x, 3, L, bad.get("t", T), bad.get("b", 0), dcf.OUT)
    assert not out.any()  # nothing written


@needs_kernel
@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1 << L), "alpha 2 outside"), (dict(beta=T), "beta 2 outside"), (dict(beta=-1), "beta 2 outside"),
    (dict(seeds=1), "seeds has"), (dict(t=1 << 48), "bad parameters"), (dict(out=3), "bad parameters")])
def test_kernel_gen_rejects_bad_input_with_one_line(bad, match):
    alpha = np.array([1, 2, bad.get("alpha", 3)], np.int64)
    beta = np.array([[1, 1], [2, 2], [bad.get("beta", 3), 3]], np.int64)
    seeds = np.zeros((2, 3 - bad.get("seeds", 0), 2), np.uint64)
    k0, k1 = (np.zeros((3, dcf.key_words(L)), np.int64) for _ in range(2))
    with pytest.raises(ValueError, match=match):
        dcf._dcf.gen(k0, k1, alpha, beta, seeds, 3, L, bad.get("t", T), bad.get("out", dcf.OUT))
    assert not k0.any() and not k1.any()  # nothing written


def _high_reference(bits, k, t):
    """sum_{i >= k} bits_i 2^(i - k) mod t with Python integers."""
    return [sum(int(b) << (i - int(kk)) for i, b in enumerate(row) if i >= kk) % t for row, kk in zip(bits, k)]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 62), st.integers(0, 2**32))
def test_high_part_equals_python_integers(n, L_, seed):
    """compare.high_part (the truncations' r_h), C and numpy, against exact integers: any L, any k in
    [0, L], shares at 0 and t - 1 (the largest Horner step)."""
    from cryptogen.mpc.compare import high_part
    rng = np.random.default_rng(seed)
    t = T if L_ <= 42 else (1 << 61) - 1  # numpy's reference needs t < 2^42; C takes up to 2^62
    bits = rng.integers(0, t, (n, L_))
    bits[0] = t - 1
    bits[-1, : L_ // 2] = 0
    k = rng.integers(0, L_ + 1, n)
    k[0] = 0
    want = _high_reference(bits, k, t)
    if dcf.high_kernel() is not None:
        out = np.empty(n, np.int64)
        dcf.high_kernel()(out, bits, k, n, L_, t)
        assert out.tolist() == want
    if t == T:
        with pytest.MonkeyPatch.context() as mp:  # (hypothesis runs many examples per fixture)
            mp.setenv(dcf.KERNEL_ENV, "numpy")
            assert dcf.high_kernel() is None
            assert high_part(bits, k, t).tolist() == want


@pytest.mark.skipif(dcf.high_kernel() is None, reason="C kernel not built")
@pytest.mark.parametrize("bad, match", [(dict(k=L + 1), "shift 1 outside"), (dict(k=-1), "shift 1 outside"),
                                        (dict(bit=T), "bit share 1 outside"), (dict(n=2), "bits has"),
                                        (dict(t=1 << 62), "bad parameters")])
def test_high_kernel_rejects_bad_input_with_one_line(bad, match):
    bits = np.ones((3, L), np.int64)
    bits[1, 5] = bad.get("bit", 1)
    k = np.array([1, bad.get("k", 2), 3], np.int64)
    out = np.zeros(bad.get("n", 3), np.int64)
    with pytest.raises(ValueError, match=match):
        dcf._dcf.high(out, bits, k[: len(out)], len(out), L, bad.get("t", T))  # n = 2: 3 rows of bits
    assert not out.any()  # nothing written
