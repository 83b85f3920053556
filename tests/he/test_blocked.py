"""Batched prefill (he/blocked.py): the blocked layout against the field product X W mod t.

The layout algebra is checked on a plaintext slot model (SEAL's row rotation: slot i of a row takes
slot i + s), the kernels under HE on both linear-layer kernels, and the two-party protocol end to end.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_linear_many
from cryptogen.field import matmul, random_elements
from cryptogen.he import (BlockPlan, EncodedLinear, ShapeError, block_plan, h2s_server, matmul_blocked,
                          prefill_plan, s2h_server)


def _rot(slots, s, n):
    return np.roll(np.asarray(slots).reshape(2, n // 2), -s, axis=1).reshape(-1)


def _simulate(bp: BlockPlan, W, X, t):
    """Y = X W by the module's steps on plaintext slots (rotations, products, sums as in matmul_blocked)."""
    outs = {}
    for c, xs in enumerate(bp.input_slots(X)):
        babies = [_rot(x, a * bp.tb, bp.n) for x in xs for a in range(bp.g1)]
        for v in range(bp.V):
            acc = np.zeros(bp.n, object)
            for b in range(bp.g2):
                diags = bp.diagonals(W, v, b).reshape(bp.U * bp.g1, bp.n)
                z = sum(babies[i].astype(object) * diags[i] for i in range(len(diags)))
                acc = acc + _rot(z, b * bp.g1 * bp.tb, bp.n)
            outs[(c, v)] = np.mod(acc, t).astype(np.int64)
    return bp.read_output([outs[k] for k in bp.output_order(len(X))], len(X), t)


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 70), d_out=st.integers(1, 90), T=st.integers(1, 13), tb=st.sampled_from([1, 2, 4, 8]),
       g1=st.sampled_from([1, 2, 4, 8]), split=st.sampled_from(["out", "in"]), seed=st.integers(0, 2 ** 31))
def test_layout_computes_the_field_product(d_in, d_out, T, tb, g1, split, seed):
    """Any shape, token count (partial last block), baby-step count and row split: several input
    ciphertexts (d_in > B or 2B), several outputs (d_out > 2B or B) and giant steps past the last
    diagonal."""
    n, t = 64, 65537
    bp = BlockPlan(d_in, d_out, n, tb, min(g1, n // 2 // tb), split)
    rng = np.random.default_rng(seed)
    W, X = random_elements((d_in, d_out), t, rng), random_elements((T, d_in), t, rng)
    assert np.array_equal(_simulate(bp, W, X, t), matmul(X, W, t))


def test_plan_shapes_and_choice():
    """GPT-2's c_fc: 6 inputs of 128 blocks, 12 outputs, ct x pt per token at the ideal d_in d_out / n;
    short prompts and decode keep the per-token encoding, long prompts take the blocks."""
    from cryptogen.he import plan_linear
    bp = block_plan(768, 3072, 16384)
    assert (bp.B, bp.U, bp.V, bp.tb) == (128, 6, 12, 64) and bp.g1 in (4, 8, 16)
    assert bp.chunk_ct_pt() == 64 * 768 * 3072 // 16384
    plan = plan_linear(768, 3072, 16384)
    assert prefill_plan(plan, 1) is None and prefill_plan(plan, 4) is None
    assert prefill_plan(plan, 512) == bp
    assert max(bp.rotation_steps()) < 8192 and all(s % 64 == 0 for s in bp.rotation_steps())
    with pytest.raises(ShapeError, match="must divide"):
        block_plan(10, 10, 16384, tb=48)
    with pytest.raises(ShapeError, match=r"shape \(T, 10\)"):
        block_plan(10, 10, 16384).input_slots(np.zeros((3, 11)))


@pytest.mark.parametrize("kernel", ["ntt", "seal"])
@pytest.mark.parametrize("shape,T,split", [((100, 37), 70, "in"), ((130, 300), 5, "out"), ((300, 130), 5, "in")])
def test_blocked_kernel_equals_field_product(cfg, ctx, keys, client, rng, kernel, shape, T, split):
    """Under HE (N = 16384, 64 tokens per block, 8 baby steps): 2 chunks with a partial one; rows
    splitting the outputs (2 inputs, 2 outputs per chunk) and the inputs (partial sums of the two
    rows added in shares; 2 inputs, 2 outputs). Ops as counted by the plan."""
    from cryptogen.he import ServerEngine
    engine = ServerEngine(ctx)
    bp = BlockPlan(*shape, cfg.n, 64, 8, split)
    assert (bp.U, bp.V) == ((1, 1) if T == 70 else (2, 2))
    W, X = random_elements(shape, cfg.t, rng), random_elements((T, shape[0]), cfg.t, rng)
    Xs = random_elements(X.shape, cfg.t, rng)
    enc = EncodedLinear(engine, W, kernel=kernel)
    xs = [[s2h_server(engine, client.s2h_send(xc), xs_) for xc, xs_ in zip(cc, cs)]
          for cc, cs in zip(bp.input_slots((X - Xs) % cfg.t), bp.input_slots(Xs))]
    before = (engine.stats.rotations, engine.stats.ct_pt_mul)
    shares = [h2s_server(engine, y) for y in matmul_blocked(enc, bp, xs)]
    Yc = bp.read_output([client.h2s_receive(d) for d, _ in shares], T, cfg.t)
    Ys = bp.read_output([r for _, r in shares], T, cfg.t)
    assert np.array_equal((Yc + Ys) % cfg.t, matmul(X, W, cfg.t))
    chunks = bp.chunks(T)
    assert engine.stats.rotations - before[0] == chunks * bp.chunk_rotations()
    assert engine.stats.ct_pt_mul - before[1] <= chunks * bp.chunk_ct_pt()


def test_prefill_protocol_uses_blocks_and_one_round_trip(cfg, engine, client, plans, rng):
    """``linear_many_*`` at T = 70 on (100, 37) takes the blocked path: shares of X W + b equal the
    field product exactly, with 2 uploads (one per 64-token chunk) in one round, and 2 output
    ciphertexts where 70 decode encodings send 70."""
    plan, T, t = plans[(100, 37)], 70, cfg.t
    assert prefill_plan(plan, T) is not None
    W, X, b = random_elements((100, 37), t, rng), random_elements((T, 100), t, rng), random_elements(37, t, rng)
    Xs = random_elements(X.shape, t, rng)
    Yc, Ys, cc = run_linear_many(engine, client, EncodedLinear(engine, W, plan), X, Xs, b)
    assert np.array_equal((Yc + Ys) % t, (matmul(X, W, t) + b) % t)
    assert cc.stats["online"].rounds == 1 and cc.stats["online"].msgs_sent == 2
    assert engine.stats.cts_server_to_client == 2 < T * plan.decode_outputs
