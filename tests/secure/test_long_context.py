"""Secure decode at the shipped model's longest context, against the plaintext model.

A secure prefill of 509 tokens is ~20 minutes here, so the encrypted KV caches are filled from the
float64 model's K and V, rounded at the secure encoding and appended through the real KV-prefill
protocol from uniform shares (``InProcessRunner.fill_caches``). The decode steps then run
securely at positions 509 and 510: q.K over 8 KV ciphertexts per layer, a softmax over 510-511
keys, p.V, and the 2PC LayerNorm, GELU and LM head. This is the part of the logit error that
grows with the context (docs/BENCHMARKS.md, "Accuracy"); the prefill's own error is measured by
``scripts/secure_error_by_position.py --window 512 --chunk 64``.

Tolerance: secure logits within 0.05 (max abs) of the float32 reference, greedy tokens equal to
the plaintext model's (as tests/secure/test_shipped_checkpoint.py).
"""
import pytest

from conftest import assert_logits_close, plain_greedy

from cryptogen import registry
from cryptogen.data import first_tokens
from cryptogen.driver import Driver
from cryptogen.plan import make_plan
from cryptogen.scheduler.inprocess import InProcessRunner, plaintext_kv

pytestmark = pytest.mark.slow
TOL = 0.05
P = 509  # cached positions; decode steps at 509 and 510 (the model has 512)


def test_shipped_model_decodes_at_context_511_like_plaintext():
    model, tok, _ = registry.load("wikitext2")
    model.eval()
    cfg = model.config
    ids = first_tokens(tok, "wikitext2", P + 1)
    assert len(ids) == P + 1 and P + 2 <= cfg.n_positions
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, ids)
    runner.fill_caches(plaintext_kv(model, ids[:P]))
    cache = runner.shards[0]._cache(runner.sid, 0, 0, cfg.n_head)
    assert cache.length == P and len(cache.k) == -(-P // cache.layout.tpc) > 1
    driver = Driver(runner, cfg, plan)
    for position in (P, P + 1):
        driver.decode_one_token(position)
    tokens = runner.client.tokens[P + 1:]
    assert tokens == plain_greedy(model, ids, 2)
    assert_logits_close(runner.client.logit_history, model, ids, tokens, TOL)
