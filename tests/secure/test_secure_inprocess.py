"""Secure generation with both parties in one process (no Ray) against the plaintext model.

Tolerance: secure logits within 0.05 (max abs) of the float32 reference; greedy tokens equal.
The fixed-point pipeline (f = 12 fractional bits, truncations of +-1.5 ulp, 2PC softmax/GELU/
LayerNorm errors of ~1e-3, see docs/MPC.md) measures ~0.01 on this model.
"""
import numpy as np
import pytest
from transformers import GPT2LMHeadModel

from conftest import PROMPT, assert_logits_close, plain_greedy

from cryptogen.driver import Driver
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.plan import make_plan

pytestmark = pytest.mark.slow
TOL = 0.05


def run(model, workers, mode, n_tokens, prompt=PROMPT):
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, workers)
    runner = InProcessRunner(model, plan, prompt)
    Driver(runner, cfg, plan, mode).generate(len(prompt), n_tokens)
    return runner


# recompute over one worker is left out: the same stages as over two, on one shard (suite time)
@pytest.mark.parametrize("workers, mode", [(1, "kv-reuse"), (2, "kv-reuse"), (2, "recompute")])
def test_secure_greedy_equals_plaintext(tiny_model, workers, mode, tmp_path):
    # recompute re-runs the whole prefix for every token; one worker: the same stages as two.
    # 10 tokens over one worker: 5 distinct greedy tokens (8: 3); two workers run the same stages
    # split, 3 tokens there; recompute: the prefill and one pass over the whole prefix (suite time)
    n = 2 if mode == "recompute" else 10 if workers == 1 else 3
    runner = run(tiny_model, workers, mode, n)
    tokens = runner.client.generated
    assert tokens == plain_greedy(tiny_model, PROMPT, n)
    if n == 10:
        assert len(set(tokens)) > 3  # a non-degenerate continuation
    assert_logits_close(runner.client.logit_history, tiny_model, PROMPT, tokens, TOL)
    # kv-reuse keeps one cache entry per token; recompute rebuilt it for the last pass only
    cache = runner.shards[0].sessions[runner.sid]["caches"][(0, 0)]  # layer 0, head group 0
    assert cache.length == len(PROMPT) + n - 1
    if workers == 1:  # and against `transformers` itself: the checkpoint loaded as a GPT2LMHeadModel
        _assert_matches_transformers(tiny_model, tmp_path, tokens, runner.client.logit_history)


def _assert_matches_transformers(model, tmp_path, tokens, logit_history):
    import torch
    model.save_pretrained(tmp_path, dtype=torch.float32)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT + tokens])).logits[0].numpy()
    for i, lg in enumerate(logit_history):
        assert np.abs(lg - ref[len(PROMPT) - 1 + i]).max() <= TOL


def test_server_shards_hold_no_secret_key(tiny_model):
    runner = run(tiny_model, 2, "kv-reuse", 1)
    sk = runner.keys.secret_key_bytes()
    public = runner.keys.public_context_bytes()
    assert sk[-4096:] not in public  # the serialized secret key does not cross
    for shard in runner.shards.values():
        shard.ctx.assert_public()
        assert shard.ctx.he.is_secret_key_empty()


def test_dealer_free_provider_end_to_end(tiny_model):
    """The same pipeline with Beaver triples and solved bits made between client and server
    with HE (no dealer); the run reports the provider it used."""
    from cryptogen.mpc.provider_he import HEProvider

    cfg = tiny_model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(tiny_model, plan, PROMPT, provider_factory=HEProvider)
    Driver(runner, cfg, plan).generate(len(PROMPT), 1)
    assert runner.client.generated == plain_greedy(tiny_model, PROMPT, 1)
    counters = runner.client_parties[0].cr.counters()
    assert counters["provider"] == "he" and counters["produced"]["triple"] > 0
    assert runner.client_parties[0].chan.stats["offline"].bytes_sent > 0


def test_chunked_prefill_equals_one_pass(tiny_model):
    """A prompt prefilled in chunks (each attending to the cache the earlier ones filled, as
    ``cryptogen bench`` grows the context) continues exactly like plaintext."""
    prompt = [3, 17, 200, 9, 41, 77, 5]
    cfg = tiny_model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(tiny_model, plan, prompt)
    driver = Driver(runner, cfg, plan)
    driver.prefill(len(prompt), chunk=3)  # passes of 3, 3 and 1 tokens (the last one a decode step)
    driver.decode_one_token(len(prompt))  # one decode step on the cache the chunks filled
    tokens = runner.client.generated
    assert tokens == plain_greedy(tiny_model, prompt, 2)
    assert len(runner.client.logit_history) == 2  # the LM head ran on the last chunk only
    assert_logits_close(runner.client.logit_history, tiny_model, prompt, tokens, TOL)
    with pytest.raises(ValueError, match="chunk"):
        driver.prefill(len(prompt), chunk=0)


def test_embedding_and_head_sharded_over_two_workers(monkeypatch, request):
    """A vocabulary of 3 embedding shards (1024 rows: the only choice offered here) and a head split
    in two: worker 0 runs shards 0 and 2 plus the first half of the LM-head columns, worker 1 shard
    1 and the second half; still plaintext."""
    import torch

    from cryptogen import secure_plan as sp
    from cryptogen.model import GPT, GPTConfig
    monkeypatch.setattr(sp, "EMBED_ROW_CHOICES", (1024,))
    sp.embed_rows.cache_clear()
    request.addfinalizer(sp.embed_rows.cache_clear)  # no cached choice outlives the test

    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=2100, n_positions=64, n_embd=64, n_layer=1, n_head=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    cfg, prompt = model.config, [5, 2099, 1500, 7]
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 2)
    runner = InProcessRunner(model, plan, prompt)
    Driver(runner, cfg, plan).generate(len(prompt), 3)
    assert runner.client.generated == plain_greedy(model, prompt, 3)
    assert_logits_close(runner.client.logit_history, model, prompt, runner.client.generated, TOL)
    held = {w: sorted(k for k in s.linears if k.startswith(("embed", "head"))) for w, s in runner.shards.items()}
    assert held == {0: ["embed0", "embed2", "head"], 1: ["embed1", "head"]}


def test_odd_heads_in_unequal_kv_head_groups(monkeypatch):
    """Three heads of 16 with KV head groups of at most 32 slots: one worker's heads share cache
    ciphertexts in a group of two (32 slots) and a group of one (16), so the score and p.V reads
    of differently packed groups sit side by side; vocabulary 101, width 48. Still plaintext."""
    import torch

    from cryptogen import secure_plan as sp
    from cryptogen.model import GPT, GPTConfig

    monkeypatch.setattr(sp, "KV_GROUP_SLOTS", 32)  # both parties read it (in one process here)
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=101, n_positions=64, n_embd=48, n_layer=1, n_head=3, n_inner=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    cfg, prompt = model.config, [5, 100, 17, 42, 7]
    assert sp.head_groups(cfg.n_head, cfg.d_head) == [(0, 2), (2, 3)]
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, prompt)
    Driver(runner, cfg, plan).generate(len(prompt), 3)
    assert runner.client.generated == plain_greedy(model, prompt, 3)
    assert_logits_close(runner.client.logit_history, model, prompt, runner.client.generated, TOL)
    caches = runner.shards[0].sessions[runner.sid]["caches"]
    assert {k: c.layout.heads for k, c in caches.items()} == {(0, 0): 2, (0, 1): 1}


@pytest.mark.parametrize("workers", [2])  # one worker: tests/server and the Prometheus test (the default output)
def test_token_only_output_equals_plaintext_with_bans(tiny_model, workers):
    """--reveal token: the logits stay shared, a 2PC argmax opens the token (over 2 workers the
    winners of their columns meet in ``pick``); a banned token (the plaintext's first choice) is
    never chosen. Reference: plaintext generation with the same sampler config; no logit opened."""
    from cryptogen.sampling import Sampler, SamplingConfig

    cfg = tiny_model.config
    first = plain_greedy(tiny_model, PROMPT, 1)[0]
    sampling = SamplingConfig(logit_bias={first: -100, 7: 3.0})
    plain = list(tiny_model.generate(PROMPT, 3, Sampler(sampling)))
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, workers)
    runner = InProcessRunner(tiny_model, plan, PROMPT, sampler=Sampler(sampling))
    Driver(runner, cfg, plan, reveal="token").generate(len(PROMPT), 3)
    assert runner.client.generated == plain and first not in plain
    assert runner.client.logit_history == []
