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
import numbers
import reprlib
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
        """Every field checked (ValueError, one line) before any logit is computed: NaN, infinity,
        bools, floats where integers belong and out-of-range values are refused."""
        t = _real(self.temperature)
        if t is None or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature {_short(self.temperature)} is not allowed; use a finite number >= 0 "
                             "(0: greedy)")
        if not _integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top-k {_short(self.top_k)} is not allowed; use an integer >= 0 (0: no top-k cut)")
        p = _real(self.top_p)
        if p is None or not 0 < p <= 1:  # NaN fails both comparisons
            raise ValueError(f"top-p {_short(self.top_p)} is not allowed; use a number in (0, 1] (1: no nucleus cut)")
        if self.seed is not None and (not _integer(self.seed) or self.seed < 0):
            raise ValueError(f"seed {_short(self.seed)} is not allowed; use an integer >= 0, or none for a random seed")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", p)
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

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


def _short(v) -> str:
    return reprlib.repr(v)  # a huge number stays short


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> float | None:
    """``v`` as a float if it is a real number (not a bool, not a string), else None."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        return math.inf if v > 0 else -math.inf


def _bias_pairs(logit_bias) -> tuple:
    """(token id, bias) pairs sorted by id, from a dict or pairs; biases clipped at BAN."""
    try:
        items = list(logit_bias.items() if isinstance(logit_bias, dict) else logit_bias)
    except TypeError:
        raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {_short(logit_bias)}") from None
    bias: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got the item {_short(item)}")
        tid, b = item
        t = _real(tid)  # 3.0 is token 3
        if t is None or not (_integer(tid) or (math.isfinite(t) and t == int(t))) or t < 0:
            raise ValueError(f"logit_bias: token ids must be non-negative integers, got {_short(tid)}")
        t = int(tid)
        bv = _real(b)
        if bv is None or math.isnan(bv) or bv > 100:
            raise ValueError(f"logit_bias: biases must be in [-100, 100], got {_short(b)} for token {_short(t)}")
        bias[t] = max(bv, BAN)
    return tuple(sorted(bias.items()))


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
