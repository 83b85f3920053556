"""Token-only output (mpc/argmax.py) against numpy: the 2PC argmax is exact (ties: the first
index, as ``numpy.argmax``), the winners of column blocks combine to the global argmax, and
Gumbel-max sampling on the client's share has the plaintext sampler's distribution (chi-square,
false-alarm probability ~1e-6)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.mpc import reconstruct, share, simulate
from cryptogen.mpc.argmax import argmax_last, argmax_pairs, encode_shift, open_to_client
from cryptogen.sampling import Sampler, SamplingConfig

from mpc_helpers import FP, T

SCALE = 2 * FP.frac_bits  # logits are at scale 2^2f


def _argmax(values: np.ndarray, offset: int = 0):
    xc, xs = share(FP.encode(values, scale_bits=SCALE))
    (mc, ic), (ms, i_s) = simulate(lambda p, x: argmax_last(p, x, offset), (xc,), (xs,))
    return FP.decode(reconstruct(mc, ms), SCALE), reconstruct(ic, i_s)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=1, max_size=37), st.integers(0, 5000))
def test_argmax_is_exact_with_numpy_ties(ints, offset):
    x = np.array(ints, np.float64) / 4  # many ties: the first maximum must win
    m, i = _argmax(x, offset)
    assert i == np.argmax(x) + offset and m == pytest.approx(x.max(), abs=2 ** -SCALE)


def test_argmax_rows_and_full_range():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 300, (5, 1000))  # logits far beyond a real model's, at 2^24: |x| 2^34
    m, i = _argmax(x)
    assert (i == x.argmax(-1)).all() and np.abs(m - x.max(-1)).max() <= 2 ** -SCALE


def test_winners_of_column_blocks_give_the_global_argmax():
    """Several workers: each takes the argmax of its columns, then ``argmax_pairs`` of the winners."""
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 3, 50).astype(np.float64)  # ties across blocks too
    blocks = [(0, 13), (13, 30), (30, 50)]
    xc, xs = share(FP.encode(x, scale_bits=SCALE))

    def fn(p, shares):
        wins = [argmax_last(p, shares[lo:hi], lo) for lo, hi in blocks]
        m, i = argmax_pairs(p, np.array([w[0] for w in wins]), np.array([w[1] for w in wins]))
        return open_to_client(p, i)
    token, server = simulate(fn, (xc,), (xs,))
    assert server is None and token == np.argmax(x)


def test_only_the_client_receives_the_token():
    """Both parties see the same comparison openings; the final index share goes to the client
    only (the server's transcript is one message shorter and never holds the token)."""
    x = np.array([1.0, 3.0, 2.0, 2.5])
    xc, xs = share(FP.encode(x, scale_bits=SCALE))
    st_ = {}
    token, _ = simulate(lambda p, v: open_to_client(p, argmax_last(p, v)[1]), (xc,), (xs,), stats=st_, record=True)
    client_view, server_view = st_["client"]["transcript"], st_["server"]["transcript"]
    assert token == 1 and len(client_view) == len(server_view) + 1
    assert [m.shape for m in client_view[:-1]] == [m.shape for m in server_view]  # symmetric openings


def _sample(logits: np.ndarray, cfg: SamplingConfig, n: int) -> np.ndarray:
    """n token-only samples of the same logits: the client shifts its share by token_offsets."""
    sampler = Sampler(cfg)
    enc = FP.encode(np.broadcast_to(logits, (n, logits.size)), scale_bits=SCALE)
    shift = np.stack([encode_shift(FP, sampler.token_offsets(logits.size)) for _ in range(n)])
    xc, xs = share(enc)
    tokens, _ = simulate(lambda p, x: open_to_client(p, argmax_last(p, np.mod(x + shift, T) if p.is_client else x)[1]),
                         (xc,), (xs,))
    return tokens


def test_gumbel_sampling_has_the_plaintext_distribution():
    logits = np.array([2.0, 1.5, 0.0, -1.0, 1.9, 0.5])
    cfg = SamplingConfig(temperature=0.8, seed=5, logit_bias={3: 1.0, 5: -100})
    n = 3000
    tokens = _sample(logits, cfg, n)
    z = (logits + np.nan_to_num(cfg.mask(6), neginf=0)) / 0.8
    z[5] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(tokens, minlength=6)
    assert counts[5] == 0  # banned
    keep = p > 0
    chi2 = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum()
    assert chi2 < 33.4  # 4 degrees of freedom, p ~ 1e-6
    # the plaintext sampler, same config: the same distribution (two-sample chi-square)
    plain = Sampler(SamplingConfig(temperature=0.8, seed=6, logit_bias={3: 1.0, 5: -100}))
    pc = np.bincount([plain(logits) for _ in range(n)], minlength=6)
    both = counts + pc
    chi2_2 = sum((counts[j] - pc[j]) ** 2 / both[j] for j in range(6) if both[j])
    assert chi2_2 < 33.4


def test_greedy_with_bans_never_picks_a_banned_token():
    logits = np.array([5.0, 1.0, 4.0])
    tokens = _sample(logits, SamplingConfig(logit_bias={0: -100}), 4)
    assert (tokens == 2).all()


def test_top_k_needs_the_logits():
    with pytest.raises(ValueError, match="reveal logits"):
        Sampler(SamplingConfig(temperature=1.0, top_k=5)).token_offsets(10)
