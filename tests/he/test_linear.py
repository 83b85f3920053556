import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_linear_many
from cryptogen.field import FixedPoint, matmul, random_elements
from cryptogen.he import (EncodedLinear, ShapeError, h2s_server, matmul_ct_pt_decode, matmul_ct_pt_prefill,
                          pad_rows, plan_linear, s2h_server, shard_cols, shard_rows)


def _decode(engine, client, plan, enc, x, rng, t):
    xs = random_elements(x.shape, t, rng)
    c = s2h_server(engine, client.s2h_send(plan.input_slots_decode((x - xs) % t)), plan.input_slots_decode(xs))
    shares = [h2s_server(engine, o) for o in matmul_ct_pt_decode(enc, c)]
    yc = plan.read_output_decode([client.h2s_receive(d) for d, _ in shares], t)
    ys = plan.read_output_decode([r for _, r in shares], t)
    return (yc + ys) % t


@pytest.mark.parametrize("shape", [(100, 37), (128, 384), (64, 130)])
def test_decode_exact_in_field(cfg, engine, client, plans, rng, shape):
    plan = plans[shape]
    W = random_elements(shape, cfg.t, rng)
    x = random_elements(shape[0], cfg.t, rng)
    enc = EncodedLinear(engine, W, plan)
    assert np.array_equal(_decode(engine, client, plan, enc, x, rng, cfg.t), matmul(x[None], W, cfg.t)[0])
    assert engine.stats.ct_pt_mul <= plan.decode_ct_pt <= 1.5 * plan.ideal_ct_pt


def test_a_field_matrix_is_held_once_and_other_integers_reduced(cfg, engine, client, plans, rng):
    """A shard's weights are already field matrices: the layer keeps that array (no second copy of a
    worker's weights); signed integers are reduced mod t into a copy, and both decode to x W mod t."""
    plan = plans[(100, 37)]
    W = random_elements((100, 37), cfg.t, rng)
    assert EncodedLinear(engine, W, plan).W is W
    signed = np.where(W > cfg.t // 2, W - cfg.t, W)  # the same matrix, negative entries signed
    enc = EncodedLinear(engine, signed, plan)
    assert enc.W is not signed and np.array_equal(enc.W, W)
    x = random_elements(100, cfg.t, rng)
    assert np.array_equal(_decode(engine, client, plan, enc, x, rng, cfg.t), matmul(x[None], W, cfg.t)[0])


def test_decode_fixed_point(cfg, engine, client, plans, rng):
    """Reals at f fractional bits: |error| <= d_in * 2^-f * (|x|max + |w|max) / 2 + 2^-2f."""
    fp = cfg.fixed_point
    plan = plans[(128, 384)]
    Wr, xr = rng.uniform(-1, 1, (128, 384)), rng.uniform(-4, 4, 128)
    enc = EncodedLinear(engine, fp.encode(Wr), plan)
    y = fp.decode(_decode(engine, client, plan, enc, fp.encode(xr), rng, cfg.t), scale_bits=2 * fp.frac_bits)
    bound = 128 * 2.0 ** -fp.frac_bits * (4 + 1) / 2 + 2.0 ** (-2 * fp.frac_bits)
    assert np.max(np.abs(y - xr @ Wr)) <= bound


def test_prefill_many_tokens(cfg, engine, keys, client, plans, rng):
    plan = plans[(100, 37)]
    W, X = random_elements((100, 37), cfg.t, rng), random_elements((9, 100), cfg.t, rng)
    enc = EncodedLinear(engine, W, plan)
    cts = [engine.receive(client.s2h_send(s)) for s in plan.input_slots_prefill(X)]
    assert len(cts) == -(-9 // plan.lanes)
    out = matmul_ct_pt_prefill(enc, cts)
    Y = plan.read_output_prefill([[keys.decrypt(c.ct) for c in row] for row in out], 9, cfg.t)
    assert np.array_equal(Y, matmul(X, W, cfg.t))


def test_many_tokens_in_one_round_trip(cfg, engine, client, plans, rng):
    """``linear_many_*`` (prefill's linear layers): T tokens' shares of X W + b equal the field
    product exactly, and the client's T uploads go in one flight (one round, not T)."""
    plan, T, t = plans[(100, 37)], 5, cfg.t
    W, X, b = random_elements((100, 37), t, rng), random_elements((T, 100), t, rng), random_elements(37, t, rng)
    Xs = random_elements(X.shape, t, rng)
    Yc, Ys, cc = run_linear_many(engine, client, EncodedLinear(engine, W, plan), X, Xs, b, timeout=60)
    assert np.array_equal((Yc + Ys) % t, (matmul(X, W, t) + b) % t)
    assert cc.stats["online"].rounds == 1 and cc.stats["online"].msgs_sent == T


def test_row_and_column_shards(cfg, ctx, keys, client, rng):
    from cryptogen.he import ClientKeys, ClientRole, ServerEngine
    d_in, d_out = 100, 37
    plan, bounds = shard_rows(d_in, d_out, cfg.n, 2)
    W, x = random_elements((d_in, d_out), cfg.t, rng), random_elements(d_in, cfg.t, rng)
    k2 = ClientKeys.generate(cfg, plan.rotation_steps())
    eng, cl = ServerEngine(k2.public_context()), ClientRole(k2)
    parts = []
    for lo, hi in bounds:  # each worker: its rows of W and its slice of x
        enc = EncodedLinear(eng, pad_rows(W[lo:hi], plan.d_in), plan)
        xin = eng.receive(cl.s2h_send(plan.input_slots_decode(pad_rows(x[lo:hi], plan.d_in))))
        parts.append(matmul_ct_pt_decode(enc, xin))
    summed = [eng.sum([p[m] for p in parts]) for m in range(plan.decode_outputs)]
    y = plan.read_output_decode([k2.decrypt(c.ct) for c in summed], cfg.t)
    assert np.array_equal(y, matmul(x[None], W, cfg.t)[0])
    cols = shard_cols(d_out, 3)
    assert cols[0][0] == 0 and cols[-1][1] == d_out and len(cols) == 3


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 700), d_out=st.integers(1, 3000))
def test_plan_properties(d_in, d_out):
    p = plan_linear(d_in, d_out, 8192)
    assert p.D >= d_in and p.C * p.g == p.D and (p.P - p.g) % p.D == 0
    assert p.lanes >= 2 and p.lanes_per_row * p.stride <= 4096
    assert p.decode_ct_pt <= max(1.5 * p.ideal_ct_pt, p.g)
    assert max(p.rotation_steps() | {0}) < 4096
    x = np.arange(1, d_in + 1)
    slots = p.input_slots_decode(x)
    assert set(np.unique(slots)) <= set(range(d_in + 1))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(d_out=st.integers(1, 60), seed=st.integers(0, 2 ** 16))
def test_decode_random_shapes(cfg, engine, keys, d_out, seed):
    """Any d_out with d_in = 100 reuses the session keys when the plan's steps are covered."""
    plan = plan_linear(100, d_out, cfg.n)
    if not plan.rotation_steps() <= set(keys.rotation_steps):
        return
    rng = np.random.default_rng(seed)
    W, x = random_elements((100, d_out), cfg.t, rng), random_elements(100, cfg.t, rng)
    c = engine.encrypt(plan.input_slots_decode(x))
    outs = matmul_ct_pt_decode(EncodedLinear(engine, W, plan), c)
    assert np.array_equal(plan.read_output_decode([keys.decrypt(o.ct) for o in outs], cfg.t), matmul(x[None], W, cfg.t)[0])


def test_shape_errors(cfg, engine, plans):
    plan = plans[(100, 37)]
    with pytest.raises(ShapeError, match="shape"):
        plan.input_slots_decode(np.zeros(99))
    with pytest.raises(ShapeError, match="do not match"):
        EncodedLinear(engine, np.zeros((101, 37)), plan)
    with pytest.raises(ShapeError):
        plan.read_output_decode([], cfg.t)
