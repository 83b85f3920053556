"""GPT-2's "massive activations" (issue #11): a few residual dimensions of magnitude ~10^3 at some
tokens (Sun et al. 2024, "Massive activations in large language models": ~3000 in GPT-2). The
secure LayerNorm's wide path (``GPTConfig.ln_range`` 4096, mpc/layernorm.py) must hold them.

Reference: the plaintext model (float32). Tolerance as every end-to-end test: greedy tokens equal,
secure logits within 0.05 (max abs); measured 0.0015. With ``secure_ln_range`` 256 (the narrow
path) the same run gives other tokens (42 x 4 against 201 x 4) and a logit error of 3.0: the
mutation this test catches (tried once by hand; per LayerNorm call the contrast is
tests/mpc/test_mpc_layernorm.py::test_wide_path_holds_outliers).
"""
import dataclasses

import numpy as np
import pytest
import torch

import tiny
from conftest import assert_logits_close, plain_greedy

from cryptogen.driver import Driver
from cryptogen.plan import make_plan
from cryptogen.scheduler.inprocess import InProcessRunner

pytestmark = pytest.mark.slow
TOL = 0.05
PROMPT = [3, 17, 40]
N = 4


@pytest.fixture(scope="module")
def outlier_model():
    cfg = dataclasses.replace(tiny.TINY, secure_ln_range=4096.0)
    model = tiny.tiny_model(cfg)
    # As in GPT-2: huge values in fixed dimensions, at the first position, and written by an early
    # MLP (not in the token embedding, which is the tied LM head)
    with torch.no_grad():
        model.transformer.wpe.weight[0, 7] = 3000.0       # the first position, from the start
        model.transformer.wpe.weight[:, 23] += 400.0      # every position, a milder one
        model.transformer.h[0].mlp.c_proj.bias[11] = -2500.0  # from layer 0's MLP on
    return model


def test_secure_generation_holds_massive_activations(outlier_model):
    m = outlier_model
    seen = []  # the residual stream really carries them into the LayerNorms
    hooks = [mod.register_forward_pre_hook(lambda _m, a: seen.append((a[0] - a[0].mean(-1, keepdim=True)).abs()))
             for mod in (m.transformer.h[1].ln_1, m.transformer.ln_f)]
    with torch.no_grad():
        m(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    assert all(s[0, 0].max() > 2900 and s[0, 1:].max() > 2400 for s in seen), [s.amax(-1) for s in seen]
    cfg = m.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(m, plan, PROMPT)
    Driver(runner, cfg, plan, "kv-reuse").generate(len(PROMPT), N)
    tokens = runner.client.generated
    assert tokens == plain_greedy(m, PROMPT, N)
    worst = assert_logits_close(runner.client.logit_history, m, PROMPT, tokens, TOL)
    print(f"\nmax logit error with outliers of 3000: {worst:.4f}")
    assert np.isfinite(worst)
