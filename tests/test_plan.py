import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from cryptogen.plan import PlanError, make_plan


@settings(max_examples=60, deadline=None)
@given(n_layer=st.integers(1, 6), n_head=st.integers(1, 12), d_ff=st.integers(1, 64),
       n_workers=st.integers(1, 6), groups=st.integers(1, 3))
def test_every_head_and_column_assigned_exactly_once(n_layer, n_head, d_ff, n_workers, groups):
    try:
        plan = make_plan(n_layer, n_head, d_ff, n_workers, groups)
    except PlanError:
        assert groups > min(n_layer, n_workers) or -(-n_workers // groups) > n_head or d_ff < n_workers
        return
    for layer in range(n_layer):
        owners = plan.owners(layer)
        assert sorted(h for _, s in owners for h in s.heads) == list(range(n_head))
        assert sum(s.ff_width for _, s in owners) == d_ff
    assert sorted(w.worker for w in plan.workers) == list(range(n_workers))


def test_two_workers_split_heads_and_columns():
    plan = make_plan(n_layer=2, n_head=4, d_ff=512, n_workers=2)
    assert plan.workers[0].shard(1).heads == (0, 2) and plan.workers[1].shard(1).heads == (1, 3)
    assert plan.workers[0].shard(0).ff_cols == (0, 256) and plan.workers[1].shard(0).ff_cols == (256, 512)
    assert plan.lead(0) == 0


def test_layer_groups_pipeline_layers():
    plan = make_plan(n_layer=4, n_head=2, d_ff=8, n_workers=2, layer_groups=2)
    assert plan.workers[0].layers == (0, 1) and plan.workers[1].layers == (2, 3)
    assert plan.workers[1].shard(2).heads == (0, 1)


@pytest.mark.parametrize("args, msg", [
    ((2, 2, 8, 3, 1), "only 2 heads"), ((2, 2, 8, 0, 1), "at least one worker"), ((2, 2, 8, 2, 3), "layer_groups"),
])
def test_impossible_plans_are_rejected(args, msg):
    with pytest.raises(PlanError, match=msg):
        make_plan(*args)


def test_validate_catches_a_double_assignment():
    plan = make_plan(1, 2, 8, 2)
    w0 = plan.workers[0]
    bad = dataclasses.replace(w0, shards=(dataclasses.replace(w0.shards[0], heads=(0, 1)),))
    with pytest.raises(PlanError, match="exactly once"):
        dataclasses.replace(plan, workers=(bad, plan.workers[1])).validate()


@pytest.mark.parametrize("vocab, workers", [(256, 1), (256, 3), (4096, 2), (4096, 3), (50257, 4)])
def test_embedding_and_head_are_dealt_exactly_once(vocab, workers):
    """Every embedding row shard and every LM-head column goes to exactly one worker; worker 0
    (which adds the positions) has shard 0; the head columns are contiguous in worker order."""
    from cryptogen import secure_plan as sp
    from cryptogen.model import GPTConfig

    cfg = GPTConfig(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, workers)
    owners = sp.embed_owners(cfg, plan)
    dealt = sorted(i for shards in owners.values() for i in shards)
    assert dealt == list(range(len(sp.embed_shards(cfg)))) and 0 in owners[0]
    cols = sp.head_columns(cfg, plan)
    spans = [cols[w] for w in sorted(cols)]
    assert spans[0][0] == 0 and spans[-1][1] == vocab
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))


@settings(max_examples=200, deadline=None)
@given(heads=st.integers(1, 40), d_head=st.integers(1, 600))
def test_kv_head_groups_tile_the_heads(heads, d_head):
    """KV head groups: contiguous, every head exactly once, at most KV_GROUP_SLOTS slots per group
    (or a single head), near-equal sizes, as few groups as the cap allows."""
    from cryptogen import secure_plan as sp

    groups = sp.head_groups(heads, d_head)
    assert groups[0][0] == 0 and groups[-1][1] == heads and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    sizes = [b - a for a, b in groups]
    assert all(s * d_head <= sp.KV_GROUP_SLOTS or s == 1 for s in sizes) and max(sizes) - min(sizes) <= 1
    per = max(1, sp.KV_GROUP_SLOTS // d_head)
    assert len(groups) == -(-heads // per)
