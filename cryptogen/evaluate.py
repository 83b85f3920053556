"""Perplexity and LAMBADA last-word accuracy of the plaintext reference model."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .data import lambada_examples, load_text
from .model import GPT


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # predicted tokens
    words: int  # whitespace words (+1 end-of-line per line) in the text scored
    nll: float  # summed negative log-likelihood, nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_ppl(self) -> float:
        """Perplexity normalised per word, comparable across tokenizers."""
        return math.exp(self.nll / self.words)


def _check_count(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} {value!r} is not allowed; use an integer >= {lo}")


def eval_windows(ids: np.ndarray, window: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of ``window`` tokens (the first token of each is context only)."""
    _check_count("window", window, 2)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens, 1)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window - 1) if len(ids[i:i + window]) > 1]


@torch.no_grad()
def perplexity(model: GPT, tokenizer, dataset: str, split: str = "test", data_dir=None,
               max_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    if max_tokens is not None:  # checked before the text is read and encoded
        _check_count("max_tokens", max_tokens, 1)
    text = load_text(dataset, split, data_dir)
    ids = np.concatenate([np.asarray(e.ids, np.int64) for e in tokenizer.encode_batch(text.splitlines(keepends=True))])
    windows = eval_windows(ids, model.config.n_positions, max_tokens)
    nll, count = 0.0, 0
    for w in tqdm(windows, desc=f"ppl {dataset}/{split}", disable=not progress):
        nll_w, n_w = window_nll(model, w)
        nll, count = nll + nll_w, count + n_w
    scored = tokenizer.decode(np.concatenate([windows[0][:1]] + [w[1:] for w in windows]).tolist())
    words = len(scored.split()) + scored.count("\n")
    return PerplexityResult(tokens=count, words=max(words, 1), nll=nll)


@torch.no_grad()
def window_nll(model: GPT, window: np.ndarray) -> tuple[float, int]:
    if not 2 <= len(window) <= model.config.n_positions + 1:
        raise ValueError(f"a window of {len(window)} tokens cannot be scored; use 2..{model.config.n_positions + 1} "
                         "tokens (the model's context + 1)")
    x = torch.as_tensor(window[None, :-1])
    y = torch.as_tensor(window[None, 1:])
    logits, _ = model(x)  # (1, T, V)
    loss = torch.nn.functional.cross_entropy(logits[0].double(), y[0], reduction="sum")
    return float(loss), int(y.numel())


@torch.no_grad()
def lambada_accuracy(model: GPT, tokenizer, data_dir=None, limit: int | None = None,
                     progress: bool = True) -> tuple[float, int]:
    """Fraction of test passages whose last word is predicted exactly (greedy, every BPE token)."""
    if limit is not None:
        _check_count("limit", limit, 1)
    examples = lambada_examples("test", data_dir, limit)
    ctx_len = model.config.n_positions
    hits = 0
    for ex in tqdm(examples, desc="lambada", disable=not progress):
        ctx = tokenizer.encode(ex.context).ids
        tgt = tokenizer.encode(" " + ex.target).ids
        seq = (ctx + tgt)[-(ctx_len + 1):]
        logits, _ = model(torch.as_tensor([seq[:-1]]))  # (1, T, V)
        pred = logits[0, -len(tgt):].argmax(-1).tolist()
        hits += pred == tgt
    return hits / max(len(examples), 1), len(examples)
