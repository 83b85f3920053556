"""Public HE layouts of a secure model: a pure function of (model shape, shard plan, N).

Both parties compute the same layouts independently: the client needs them to place its
shares in slots and to know which Galois keys to generate; the server to encode weights.
Nothing here depends on weights or data.
"""
from __future__ import annotations

import numpy as np

from dataclasses import dataclass
from functools import lru_cache

from .he import required_rotation_steps
from .he.kvcache import KVLayout
from .he.linear import LinearPlan, pad_rows, plan_cost, plan_linear, shard_cols
from .model import GPTConfig
from .plan import split_evenly

# Vocabulary rows per embedding shard (one encrypted one-hot and one output ciphertext each): the
# candidate with the least ``plan_cost`` over all shards (embed_rows); N = 16384 is the only ring
# degree the parameters allow (docs/HE.md), so the choice is a function of the model's shape.
EMBED_ROW_CHOICES = (512, 1024, 1536, 2048, 2560, 3072)
RING_DEGREE = 16384
# The layers' weight matrices (W_qkv with its d_head^-1/4 attention scale, W_o, c_fc, c_proj) are encoded
# at 2^(f + WEIGHT_EXTRA_BITS) and their products truncated by f + WEIGHT_EXTRA_BITS: at 2^f, rounding
# W_q and W_k was a wide head's largest logit error, and GPT-2's residual projections (std 0.02/sqrt(24))
# are ~16 ulps (docs/BENCHMARKS.md, "Accuracy"). Public: both parties truncate by the same amount.
WEIGHT_EXTRA_BITS = 4
# A worker's heads of a layer share KV-cache ciphertexts in groups of at most this many slots per token
# (kvcache.py): one product and one export then serve the group. Wider groups leave fewer tokens per
# ciphertext and gain little (docs/HE.md, "Head groups").
KV_GROUP_SLOTS = 256


@lru_cache(maxsize=None)
def linear_plan(d_in: int, d_out: int, n: int) -> LinearPlan:
    return plan_linear(d_in, d_out, n)


@dataclass(frozen=True)
class LayerLayouts:
    """One worker's share of one layer: its heads' q|k|v columns, their W_o rows, its FF slice."""

    qkv: LinearPlan  # d -> 3 * len(heads) * d_head
    o: LinearPlan  # len(heads) * d_head -> d
    fc1: LinearPlan  # d -> ff_width
    fc2: LinearPlan  # ff_width -> d


def layer_layouts(cfg: GPTConfig, n_heads: int, ff_width: int, n: int) -> LayerLayouts:
    dh = cfg.d_head
    return LayerLayouts(qkv=linear_plan(cfg.n_embd, 3 * n_heads * dh, n), o=linear_plan(n_heads * dh, cfg.n_embd, n),
                        fc1=linear_plan(cfg.n_embd, ff_width, n), fc2=linear_plan(ff_width, cfg.n_embd, n))


@lru_cache(maxsize=None)
def embed_rows(vocab_size: int, n_embd: int) -> int:
    """Rows per embedding shard: the choice (or the whole vocabulary, if it has at most 3072 rows)
    with the least plan cost over all shards. GPT-2 base 2560 (20 shards), the shipped models 2048
    (2 shards); docs/HE.md, "Embedding shards"."""
    fits = {r for r in EMBED_ROW_CHOICES if r < vocab_size} | ({vocab_size} if vocab_size <= EMBED_ROW_CHOICES[-1] else set())
    return min(fits, key=lambda r: (-(-vocab_size // r) * plan_cost(linear_plan(r, n_embd, RING_DEGREE)), r))


def embed_shards(cfg: GPTConfig) -> list[tuple[int, int]]:
    """Row ranges of the token-embedding table, one encrypted one-hot ciphertext each."""
    rows = embed_rows(cfg.vocab_size, cfg.n_embd)
    return [(lo, min(cfg.vocab_size, lo + rows)) for lo in range(0, cfg.vocab_size, rows)]


def embed_plan(cfg: GPTConfig, n: int) -> LinearPlan:
    return linear_plan(embed_rows(cfg.vocab_size, cfg.n_embd), cfg.n_embd, n)


def head_plan(cfg: GPTConfig, n: int, cols: tuple[int, int] | None = None) -> LinearPlan:
    """The tied LM head, or its vocabulary columns ``cols`` (a worker's slice)."""
    lo, hi = cols or (0, cfg.vocab_size)
    return linear_plan(cfg.n_embd, hi - lo, n)


def embed_owners(cfg: GPTConfig, shard_plan) -> dict[int, tuple[int, ...]]:
    """Embedding row shards per worker, dealt round robin so their encrypted one-hot products run
    in parallel (worker 0, which adds the positions, always has shard 0; a worker may have none)."""
    ws = [w.worker for w in shard_plan.workers]
    return {w: tuple(range(k, len(embed_shards(cfg)), len(ws))) for k, w in enumerate(ws)}


def head_columns(cfg: GPTConfig, shard_plan) -> dict[int, tuple[int, int]]:
    """Contiguous LM-head vocabulary columns per worker (every column exactly once, in worker order)."""
    return dict(zip((w.worker for w in shard_plan.workers), shard_cols(cfg.vocab_size, len(shard_plan.workers))))


def head_groups(n_heads: int, d_head: int) -> list[tuple[int, int]]:
    """A worker's ``n_heads`` heads of a layer (in its shard order) cut into near-equal contiguous
    groups of at most ``KV_GROUP_SLOTS // d_head`` heads (at least one): [start, stop) per group."""
    per = max(1, min(n_heads, KV_GROUP_SLOTS // d_head))
    return split_evenly(n_heads, -(-n_heads // per))


def kv_layout(cfg: GPTConfig, n: int, heads: int = 1) -> KVLayout:
    return KVLayout(cfg.d_head, n, heads)


def kv_layouts(cfg: GPTConfig, shard_plan, n: int) -> list[KVLayout]:
    """The KV layout of every (worker, layer, head group) of the plan."""
    return [kv_layout(cfg, n, hi - lo) for w in shard_plan.workers for s in w.shards
            for lo, hi in head_groups(len(s.heads), cfg.d_head)]


def kv_cache_bytes(cfg: GPTConfig, he_config, positions: int, shard_plan) -> int:
    """Bytes of one session's encrypted KV cache at ``positions`` tokens, all workers (an upper
    bound: fresh-level ciphertexts, 2 polynomials x data primes x n words of 8 bytes each, one for K
    and one for V per (layer, head group) per ``tpc`` tokens)."""
    per_ct = 2 * (len(he_config.qi_sizes) - 1) * he_config.n * 8 + 256
    return sum(2 * -(-positions // lay.tpc) for lay in kv_layouts(cfg, shard_plan, he_config.n)) * per_ct


def rotation_steps(cfg: GPTConfig, shard_plan, n: int) -> set[int]:
    """Every Galois step any worker's kernels use (the client generates exactly these): the
    linear layers' baby and giant steps, in decode and in batched prefill (he/blocked.py); attention and the linear layers' copy folds rotate
    nothing (the folds are done in the share domain, he/arcc.py, he/linear.py)."""
    plans = [embed_plan(cfg, n)] + [head_plan(cfg, n, cols) for cols in head_columns(cfg, shard_plan).values()]
    for w in shard_plan.workers:
        for s in w.shards:
            lay = layer_layouts(cfg, len(s.heads), s.ff_width, n)
            plans += [lay.qkv, lay.o, lay.fc1, lay.fc2]
    return required_rotation_steps(plans)


def embed_onehot_shards(cfg, token: int, n: int) -> list[np.ndarray]:
    """Client: the one-hot of ``token`` cut into the embedding row shards (zero padded)."""
    plan = embed_plan(cfg, n)
    out = []
    for lo, hi in embed_shards(cfg):
        v = np.zeros(hi - lo, np.int64)
        if lo <= token < hi:
            v[token - lo] = 1
        out.append(pad_rows(v[:, None], plan.d_in)[:, 0])
    return out
