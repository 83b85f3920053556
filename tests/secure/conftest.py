import numpy as np
import pytest
import torch

from cryptogen.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random GPT-2 whose greedy continuation is not degenerate."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():  # larger random weights: varied greedy tokens, argmax margins >= 0.05
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


PROMPT = [3, 17]


def plain_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def assert_logits_close(secure_logits, model, prompt, tokens, tol):
    full = plain_logits(model, list(prompt) + list(tokens))
    worst = max(float(np.abs(lg - full[len(prompt) - 1 + i]).max()) for i, lg in enumerate(secure_logits))
    assert worst <= tol, worst
    return worst
