"""Secure generation (both parties in one process, no Ray) on the shipped checkpoint, loaded from
disk as users run it, against the plaintext model.

Tolerance: secure logits within 0.05 (max abs) of the float32 reference, greedy tokens equal (the
same bound and reasons as tests/secure/test_secure_inprocess.py).
"""
import pytest

from conftest import assert_logits_close, plain_greedy

from cryptogen.driver import Driver
from cryptogen.model import GPT
from cryptogen.plan import make_plan
from cryptogen.registry import resolve_model
from cryptogen.scheduler.inprocess import InProcessRunner

pytestmark = pytest.mark.slow
TOL = 0.05


def _secure(model, prompt, n):
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, prompt)
    Driver(runner, cfg, plan).generate(len(prompt), n)
    return runner


def test_shipped_wikitext2_checkpoint_equals_plaintext():
    """The trained checkpoint users run (models/wikitext2: 128 wide, 2 layers, 4 heads, vocab 4096),
    loaded from disk, on a prompt from its own tokenizer."""
    from tokenizers import Tokenizer

    folder = resolve_model("wikitext2")
    model = GPT.from_pretrained(folder).eval()
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("The history of the").ids
    runner = _secure(model, prompt, 2)  # the prefill and a decode step
    tokens = runner.client.generated
    assert tokens == plain_greedy(model, prompt, 2)
    assert_logits_close(runner.client.logit_history, model, prompt, tokens, TOL)


