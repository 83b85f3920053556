import numpy as np
import pytest
import torch

from cryptogen.mpc import (RangeError, ShapeError, exp_neg, gelu, gelu_ref, layernorm, max_last, reciprocal, rsqrt,
                           softmax)

from mpc_helpers import FP, make_rng, run1

PROVIDERS = ["dealer", pytest.param("he", marks=pytest.mark.he_provider)]


def q(x):
    """The fixed-point value the protocol actually receives."""
    return FP.decode(FP.encode(x))


def test_exp_neg_in_range_and_clipped():
    rng = make_rng()
    x = np.concatenate([-np.abs(rng.normal(0, 5, 400)), [0.0, -16.0, -30.0, -1e3, 3.0]])
    y = run1(lambda p, a: exp_neg(p, a), x, out_scale=20)
    ref = torch.exp(torch.tensor(np.minimum(q(x), 0.0))).numpy()
    assert np.abs(y - ref).max() < 3e-4
    assert abs(y[-1] - 1.0) < 3e-4  # x > 0 is clipped to 0


def test_exp_neg_on_a_dense_grid_and_its_cost():
    """Against float64 e^x on 20,001 points of [-17, 0] (clipped at -16): max error < 1e-4 (measured
    2.9-3.3e-5: the degree-4 base's 3.5e-6 plus truncation ulps amplified by 4 squarings), mean error
    < 5e-6; 7 truncations and one DReLU per element with assume_nonpos (mpc/approx.py's cost)."""
    x = np.linspace(-17.0, 0.0, 20001)
    stats = {}
    y = run1(lambda p, a: exp_neg(p, a, assume_nonpos=True), x, out_scale=20, stats=stats)
    ref = np.exp(np.maximum(q(x), -16.0))
    assert np.abs(y - ref).max() < 1e-4
    assert np.abs(y - ref).mean() < 5e-6  # measured 2.1e-6; z^4/12 instead of z^4/24 gives 2.2e-5
    used = stats["client"]["randomness"]["consumed"]
    assert (used["tbits"], used["bits"]) == (7 * x.size, x.size)  # a dealer's truncation keys have one output


def test_reciprocal():
    rng = make_rng()
    x = np.concatenate([rng.uniform(1, 512, 200), [1.0, 512.0, 0.25, 4000.0]])
    y = run1(lambda p, a: reciprocal(p, a, 1.0, 512.0, FP.frac_bits, 20), x, out_scale=20)
    ref = 1.0 / np.clip(q(x), 1.0, 512.0)
    assert np.abs(y - ref).max() < 1e-5


def test_reciprocal_bad_range():
    with pytest.raises(RangeError):
        run1(lambda p, a: reciprocal(p, a, 0.0, 1.0, 12, 20), np.ones(2))


def test_rsqrt():
    rng = make_rng()
    x = np.exp(rng.uniform(np.log(0.05), np.log(5000), 200))
    y = run1(lambda p, a: rsqrt(p, a, FP.frac_bits, 0.05, 5000.0, 16), x, out_scale=16)
    ref = 1.0 / np.sqrt(q(x))
    assert np.abs(y / ref - 1).max() < 2e-3


def test_max_exact_with_mask():
    rng = make_rng()
    x = rng.normal(0, 30, (5, 37))
    mask = rng.random((5, 37)) < 0.7
    mask[:, 0] = True
    y = run1(lambda p, a: max_last(p, a, mask), x)
    assert np.array_equal(y, np.where(mask, q(x), -np.inf).max(-1))


def _softmax_ref(x, valid):
    t = torch.tensor(q(x)).masked_fill(~torch.tensor(valid), float("-inf"))
    return torch.softmax(t, -1).numpy()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_softmax_causal_prefill(provider):
    rng = make_rng()
    r, c = (6, 10) if provider == "he" else (16, 128)
    x = rng.normal(0, 8, (r, c)).clip(-30, 30)
    y = run1(lambda p, a: softmax(p, a, causal=True), x, provider=provider)
    valid = np.arange(c)[None] <= np.arange(r)[:, None] + (c - r)
    assert np.abs(y - _softmax_ref(x, valid)).max() < 1e-3
    assert np.all(y[~valid] == 0)


def test_softmax_wide_scores_and_mask():
    rng = make_rng()
    x = rng.normal(0, 300, (4, 33))
    mask = rng.random((4, 33)) < 0.5
    mask[:, 3] = True
    y = run1(lambda p, a: softmax(p, a, mask=mask), x)
    assert np.abs(y - _softmax_ref(x, mask)).max() < 1e-3


def test_softmax_finer_output_for_long_attention_rows():
    """Attention's probabilities come out at 2^(f + PROBS_EXTRA_BITS): over a 512-key row the summed
    error (what p.V multiplies by |v|) is measured ~1e-3, against ~0.07 at 2^f (1.5-ulp truncations
    of 512 entries of ~1/512). Bound: 3e-3 and a tenth of the 2^f output's, same scores."""
    from cryptogen.twoparty import PROBS_EXTRA_BITS

    x = make_rng().normal(0, 2, (3, 512))
    ref = _softmax_ref(x, np.ones(x.shape, bool))
    bits = FP.frac_bits + PROBS_EXTRA_BITS
    fine = run1(lambda p, a: softmax(p, a, out_bits=bits), x, out_scale=bits)
    coarse = run1(lambda p, a: softmax(p, a), x)
    l1_fine, l1_coarse = np.abs(fine - ref).sum(-1).max(), np.abs(coarse - ref).sum(-1).max()
    assert l1_fine < 3e-3 and l1_fine < l1_coarse / 10, (l1_fine, l1_coarse)
    with pytest.raises(ShapeError, match="output bits"):
        run1(lambda p, a: softmax(p, a, out_bits=40), x[:1, :4])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gelu(provider):
    rng = make_rng()
    n = 64 if provider == "he" else 2000
    x = np.concatenate([rng.normal(0, 3, n), np.linspace(-10, 10, 41), [1e4, -1e4]])
    y = run1(gelu, x, provider=provider)
    ref = torch.nn.functional.gelu(torch.tensor(q(x)), approximate="tanh").numpy()
    assert np.abs(y - ref).max() < 2e-3


def _ln_ref(x, g, b):
    return torch.nn.functional.layer_norm(torch.tensor(q(x)), (x.shape[-1],), torch.tensor(g),
                                          torch.tensor(b), 1e-5).numpy()


@pytest.mark.parametrize("provider,d,sigma", [("dealer", 128, 1.0), ("dealer", 768, 6.0),
                                              ("dealer", 128, 0.3),
                                              pytest.param("he", 16, 2.0, marks=pytest.mark.he_provider)])
def test_layernorm_server_private_affine(provider, d, sigma):
    rng = make_rng()
    x = rng.normal(0.5, sigma, (3, d))
    x[0, 1] = 12 * sigma  # an outlier inside the supported range
    g, b = rng.normal(1, 0.5, d), rng.normal(0, 0.3, d)
    y = run1(lambda p, a, gg=None, bb=None: layernorm(p, a, gg, bb), x, provider=provider,
             server_extra=(g, b))
    assert np.abs(y - _ln_ref(x, g, b)).max() < 1e-2


def test_layernorm_out_of_range_saturates():
    d = 64
    x = np.zeros((1, d))
    x[0, :2] = [1000.0, -1000.0]  # beyond R = 256: clipped, output saturates, stays finite
    y = run1(lambda p, a: layernorm(p, a), x)
    ref = _ln_ref(np.clip(x, -256, 256), np.ones(d), np.zeros(d))
    assert np.abs(y - ref).max() < 1e-2


def test_layernorm_client_cannot_pass_gamma():
    with pytest.raises(RangeError):
        run1(lambda p, a: layernorm(p, a, gamma=np.ones(8) if p.is_client else None), np.ones((1, 8)))


def test_long_prefill_softmax_in_row_blocks(monkeypatch):
    """A prefill's softmax over more than pieces.MAX_ELEMENTS scores goes in blocks of query rows,
    each over the keys its last row sees: against float64 on the causal mask (tolerance 1e-3, as the
    one-call softmax), the keys a row must not see exactly 0; blocks of 1, 3 and all rows agree."""
    import cryptogen.twoparty as tp

    rng = make_rng()
    H, T, start = 3, 7, 5
    x = rng.normal(0, 6, (H, T, start + T)).clip(-30, 30)
    valid = np.arange(start + T)[None] <= np.arange(T)[:, None] + start
    ref = _softmax_ref(x, np.broadcast_to(valid, x.shape))
    bits = FP.frac_bits + tp.PROBS_EXTRA_BITS
    outs, used = {}, {}
    for budget in (H * (start + T), 3 * H * (start + T), 10 ** 6):  # rows per block: 1, 3, all
        monkeypatch.setattr(tp.pieces, "MAX_ELEMENTS", budget)
        stats = {}
        outs[budget] = y = run1(lambda p, a: tp.softmax_heads(p, a, start), x, out_scale=bits, stats=stats)
        used[budget] = stats["client"]["randomness"]["consumed"]["tbits"]
        assert np.abs(y - ref).max() < 1e-3, budget
        assert np.all(y[:, ~valid] == 0)
    a, b, c = outs.values()
    assert np.abs(a - c).max() < 1e-3 and np.abs(b - c).max() < 1e-3
    n1, n3, nall = used.values()  # blocks skip the keys no row of theirs sees: fewer truncation keys
    assert n1 < n3 < nall


def test_long_calls_in_pieces(monkeypatch):
    """Comparisons and truncations over more than pieces.MAX_ELEMENTS inputs take their DCF keys a
    flat piece at a time (a ragged last piece here): GELU (a DReLU batch with 3 outputs per element,
    truncations) and LayerNorm (the server's gamma and beta) within the same tolerances against
    torch as in one call (2e-3, 1e-2), shapes kept, and the same number of items consumed."""
    from cryptogen.mpc import pieces

    rng = make_rng()
    xg = rng.normal(0, 3, (5, 9))
    xl, g, b = rng.normal(0.5, 2, (5, 8)), rng.normal(1, 0.5, 8), rng.normal(0, 0.3, 8)
    ln = lambda p, a, gg=None, bb=None: layernorm(p, a, gg, bb)  # noqa: E731
    whole, cut = {}, {}
    yg0, yl0 = run1(gelu, xg, stats=whole), run1(ln, xl, server_extra=(g, b))
    monkeypatch.setattr(pieces, "MAX_ELEMENTS", 7)
    yg, yl = run1(gelu, xg, stats=cut), run1(ln, xl, server_extra=(g, b))
    assert yg.shape == xg.shape and np.abs(yg - gelu_ref(q(xg))).max() < 2e-3
    assert yl.shape == xl.shape and np.abs(yl - _ln_ref(xl, g, b)).max() < 1e-2
    assert np.abs(yg - yg0).max() < 2e-3 and np.abs(yl - yl0).max() < 1e-2
    assert cut["client"]["randomness"]["consumed"] == whole["client"]["randomness"]["consumed"]
    assert cut["client"]["channel"]["online"]["rounds"] > whole["client"]["channel"]["online"]["rounds"]  # pieces
