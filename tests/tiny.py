"""The tiny random GPT-2 the end-to-end tests share (importable as ``tiny``: tests/ is on the
path through tests/conftest.py): weights scaled so that greedy decoding is not one repeated
token, and the plaintext greedy reference."""
from pathlib import Path

import torch

from cryptogen.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)


def tiny_model(cfg: GPTConfig = TINY) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger random weights: varied greedy tokens, argmax margins >= 0.05
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(folder: Path) -> Path:
    """The tiny model as a float32 checkpoint folder (what a server loads)."""
    tiny_model().save_pretrained(folder, dtype=torch.float32)
    return folder


def greedy(model: GPT, prompt, n: int) -> list[int]:
    """Plaintext greedy continuation of ``prompt`` (token ids)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
