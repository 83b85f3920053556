import numpy as np
import pytest
import torch

import tiny
from tiny import TINY  # noqa: F401  (re-exported for the tests here)


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random GPT-2 whose greedy continuation is not degenerate."""
    return tiny.tiny_model()


PROMPT = [3, 17]


def plain_greedy(model, prompt, n):
    return tiny.greedy(model, prompt, n)


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def assert_logits_close(secure_logits, model, prompt, tokens, tol):
    full = plain_logits(model, list(prompt) + list(tokens))
    worst = max(float(np.abs(lg - full[len(prompt) - 1 + i]).max()) for i, lg in enumerate(secure_logits))
    assert worst <= tol, worst
    return worst
