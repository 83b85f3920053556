"""Secure decoding across a KV-cache ciphertext boundary, against the plaintext model.

A 1024-wide single head fills a cache ciphertext every 16 tokens (N = 16384 slots / d_head), so a
15-token prompt and three generated tokens put the last decode step's key and value in a second
ciphertext, and its attention reads both. One layer with a narrow MLP and a 101-token vocabulary
keeps the HE work small; GPT-2's initialisation x 2 gives attention that is not uniform.

Tolerance: secure logits within 0.05 (max abs) of the float32 reference, greedy tokens equal
(measured 0.012-0.027 on this shape with W_qkv at 2^16 and probabilities at 2^18; 0.05-0.14
before, when W_q and W_k were rounded at 2^12: docs/BENCHMARKS.md, "Accuracy").
"""
import pytest

from conftest import assert_logits_close, plain_greedy

from cryptogen.driver import Driver
from cryptogen.model import GPT, GPTConfig
from cryptogen.plan import make_plan
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.secure_plan import kv_layout

pytestmark = pytest.mark.slow
TOL = 0.05


def test_decode_across_a_kv_ciphertext_boundary_equals_plaintext():
    cfg = GPTConfig(vocab_size=101, n_positions=64, n_embd=1024, n_layer=1, n_head=1, n_inner=96)
    model = GPT.random(cfg, seed=3, weight_scale=2.0)
    prompt = [(5 + 37 * i) % cfg.vocab_size for i in range(15)]
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, prompt)
    tpc = kv_layout(cfg, runner.he_config.n, cfg.n_head).tpc  # one worker: all heads in one group
    assert tpc == 16  # positions 0-15 in cache ciphertext 0, position 16 (the last step) in 1
    Driver(runner, cfg, plan).generate(len(prompt), 3)
    tokens = runner.client.generated
    assert runner.shards[0].cache_stats()["ciphertexts"] == 2 * 2  # K and V, two ciphertexts each
    assert tokens == plain_greedy(model, prompt, 3)
    assert_logits_close(runner.client.logit_history, model, prompt, tokens, TOL)
