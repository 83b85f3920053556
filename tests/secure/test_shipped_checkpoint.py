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



def test_shipped_checkpoint_long_prompt_takes_the_batched_prefill(monkeypatch):
    """A 48-token prompt: every linear layer of the prefill (qkv, W_o, fc1, fc2 of both layers and
    the two embedding shards) runs in the blocked layout (he/blocked.py, one 64-token chunk), and
    the first token and its logits still equal the plaintext model's."""
    from tokenizers import Tokenizer

    import cryptogen.twoparty as twoparty
    folder = resolve_model("wikitext2")
    model = GPT.from_pretrained(folder).eval()
    text = ("The history of the city begins in the early years of the nineteenth century , when the first "
            "settlers built a small church near the river . The town grew quickly after the railway reached it , "
            "and by the end of the century it had a market , two schools and a hospital")
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[:48]
    assert len(prompt) == 48
    shapes, blocked = [], twoparty.matmul_blocked
    monkeypatch.setattr(twoparty, "matmul_blocked",
                        lambda enc, bp, xs, engine=None: (shapes.append((bp.d_in, bp.d_out)), blocked(enc, bp, xs, engine))[1])
    runner = _secure(model, prompt, 1)
    d, ff = model.config.n_embd, model.config.d_ff
    assert sorted(shapes) == sorted([(d, 3 * d), (d, d), (d, ff), (ff, d)] * 2 + [(2048, d)] * 2)
    tokens = runner.client.generated
    assert tokens == plain_greedy(model, prompt, 1)
    assert_logits_close(runner.client.logit_history, model, prompt, tokens, TOL)
