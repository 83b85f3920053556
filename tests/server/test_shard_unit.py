"""A worker's shard (workers/shard.py) in one process, without Ray or a gateway."""
import pytest

from cryptogen import secure_plan as sp
from cryptogen.he.keys import ClientKeys
from cryptogen.he.params import HEConfig
from cryptogen.model import GPT, GPTConfig
from cryptogen.plan import make_plan
from cryptogen.workers.shard import ServerShard, SessionError


def test_a_public_context_missing_a_galois_key_the_kernels_use_is_refused():
    """The shard's linear plans need baby/giant-step keys at this shape (vocabulary 1000, width 64:
    steps {1, 2}); a client context without one of them is refused with a one-line error when the
    session opens, and the genuine one is accepted."""
    cfg = GPTConfig(vocab_size=1000, n_positions=16, n_embd=64, n_layer=1, n_head=2)
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    he = HEConfig()
    steps = sorted(sp.rotation_steps(cfg, plan, he.n))
    assert steps, "the shape must need Galois keys for this test to mean anything"
    shard = ServerShard(GPT.random(cfg, seed=0), plan.workers[0], None, holds_ends=True)
    assert shard.required_steps == set(steps)
    with pytest.raises(SessionError, match="lacks 1 Galois keys") as err:
        shard.open_session("short", ClientKeys.generate(he, steps[:-1]).public_context_bytes())
    assert "\n" not in str(err.value) and "short" not in shard.sessions
    shard.open_session("genuine", ClientKeys.generate(he, steps).public_context_bytes())
    assert "genuine" in shard.sessions


def test_a_shard_built_with_one_clients_context_keeps_its_giant_steps_keys():
    """In-process (the shard built with the client's public context, as the bench and the in-process
    tests run it), the giant steps' keys are loaded as a session's are, so the giant steps are summed
    before one mod-down (he/hoist.giant_sum) there too; every giant step of every plan is covered."""
    cfg = GPTConfig(vocab_size=2000, n_positions=16, n_embd=64, n_layer=1, n_head=2)  # LM head: giant step 4
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    he = HEConfig()
    keys = ClientKeys.generate(he, sorted(sp.rotation_steps(cfg, plan, he.n)))
    shard = ServerShard(GPT.random(cfg, seed=0), plan.workers[0], keys.public_context_bytes(), holds_ends=True)
    giants = set().union(*(enc.plan.giant_steps() for enc in shard.linears.values()))
    assert giants, "the shape must have giant steps for this test to mean anything"
    assert giants == shard.giant_steps <= set(shard.ctx.giant_keys)
