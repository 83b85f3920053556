"""Next-token choice from logits: a public logit mask (bans, ``logit_bias``), then greedy,
temperature, top-k, top-p. Used by both plaintext generation (``GPT.generate``) and secure
generation (on the client, the only party that sees logits), so the two stay comparable.

The mask is part of ``SamplingConfig``, not of the sampler's code path: it is a public vector
added to the logits before the choice. Today the client adds it to the opened logits; a later
token-only output (a 2PC argmax that opens only the chosen token) applies the same public vector
inside the protocol, by adding it to one party's share of the logits (a public constant costs no
communication), so a banned token can never be chosen there either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BAN = -100.0  # a bias at or below this bans the token (as in OpenAI's logit_bias)
UNK = "<unk>"  # the unknown-word marker of the WikiText-2 and PTB tokenizations


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    # (token id, bias added to its logit) pairs, sorted by id; a dict is accepted. <= BAN: banned.
    logit_bias: tuple = ()
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        items = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias: dict[int, float] = {}
        for tid, b in items:
            if isinstance(tid, bool) or int(tid) != tid or tid < 0:
                raise ValueError(f"logit_bias: token ids must be non-negative integers, got {tid!r}")
            b = float(b)
            if math.isnan(b) or b > 100:
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {b} for token {int(tid)}")
            bias[int(tid)] = max(b, BAN)
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))

    @property
    def banned(self) -> tuple[int, ...]:
        return tuple(t for t, b in self.logit_bias if b <= BAN)

    def with_bans(self, token_ids) -> "SamplingConfig":
        """The same config with these tokens banned too (an explicit bias of theirs is replaced)."""
        bias = dict(self.logit_bias)
        bias.update(dict.fromkeys((int(t) for t in token_ids), BAN))
        return SamplingConfig(self.temperature, self.top_k, self.seed, tuple(bias.items()), self.top_p)

    def mask(self, vocab_size: int) -> np.ndarray | None:
        """The public vector added to the logits (banned: -inf), or None when there is no bias."""
        if not self.logit_bias:
            return None
        m = np.zeros(vocab_size, np.float64)
        for tid, b in self.logit_bias:
            if tid >= vocab_size:
                raise ValueError(f"logit_bias: token {tid} is outside the vocabulary of {vocab_size}")
            m[tid] = -np.inf if b <= BAN else b
        if np.isneginf(m).all():
            raise ValueError("logit_bias bans every token of the vocabulary")
        return m


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self._mask: np.ndarray | None = None

    def __call__(self, logits) -> int:
        z = np.asarray(logits, np.float64).reshape(-1)
        if self.cfg.logit_bias:
            z = z + self._bias(z.size)
        if self.cfg.temperature == 0:
            return int(np.argmax(z))
        z = z / self.cfg.temperature
        if 0 < self.cfg.top_k < z.size:
            kth = np.partition(z, -self.cfg.top_k)[-self.cfg.top_k]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.cfg.top_p < 1:
            order = np.argsort(-p, kind="stable")
            keep = np.searchsorted(np.cumsum(p[order]), self.cfg.top_p) + 1  # first index reaching top_p
            cut = np.zeros_like(p)
            cut[order[:keep]] = p[order[:keep]]
            p = cut / cut.sum()
        return int(self.rng.choice(z.size, p=p))

    def _bias(self, vocab_size: int) -> np.ndarray:
        """The config's mask vector, built once per vocabulary size (not per token)."""
        if self._mask is None or self._mask.size != vocab_size:
            self._mask = self.cfg.mask(vocab_size)
        return self._mask

    def token_offsets(self, vocab_size: int) -> np.ndarray:
        """For token-only output (mpc/argmax.py): what the client adds to its share of the logits
        before the 2PC argmax -- the bias (banned: -inf) and, when sampling, T x i.i.d. Gumbel(0, 1)
        noise from this sampler's generator. argmax(logits + offsets) is then a sample from the same
        distribution as ``__call__`` (the Gumbel-max trick); greedy when T = 0."""
        if self.cfg.top_k or self.cfg.top_p < 1:
            raise ValueError("top-k and top-p need the logits: use --reveal logits (token-only output "
                             "supports greedy and temperature sampling)")
        off = np.zeros(vocab_size, np.float64)
        if self.cfg.logit_bias:
            off += self._bias(vocab_size)
        if self.cfg.temperature > 0:
            off += self.cfg.temperature * self.rng.gumbel(size=vocab_size)
        return off


def word_start_ids(tokenizer, word: str = UNK) -> list[int]:
    """Token ids that can begin ``word`` in generated text: tokens whose text contains it, or ends
    with a non-empty prefix of it (for ``<unk>``: " <" and "<" in the shipped tokenizers, which the
    byte-level BPE splits as " <" "unk" ">"). Banning them keeps the model from writing ``word``
    (and any "<" at all: in WikiText-2 and PTB nearly every "<" starts ``<unk>``)."""
    out = []
    for tid in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([tid])
        if word in text or any(text.endswith(word[:k]) for k in range(1, len(word))):
            out.append(tid)
    return out


def unk_bans(tokenizer, model_name: str, ban_unk: bool | None = None) -> list[int]:
    """The ``--ban-unk`` mask: the ids that start ``<unk>``. ``ban_unk`` None: on for the shipped
    models (named by their folder, as the server names its model), whose WikiText-2/PTB text is
    full of ``<unk>``; both plaintext and secure generation call this, so they stay comparable."""
    from .registry import SHIPPED

    want = model_name in SHIPPED if ban_unk is None else ban_unk
    return word_start_ids(tokenizer) if want and tokenizer is not None else []


def ban_note(bans) -> str:
    return f", {UNK} banned (--no-ban-unk to allow)" if bans else ""
