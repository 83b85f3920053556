"""Secret-shared argmax over the vocabulary: token-only output (``--reveal token``).

Construction: a tournament tree of secure comparisons (as in the max of SecureML / CrypTen's
``argmax``, here with index shares carried along, SecureNN-style): pairs of adjacent
candidates (a, i_a), (b, i_b) with i_a < i_b become
    bit = [a >= b] (DReLU of a - b, ``compare.drelu``),
    (m, i) = (b + bit (a - b), i_b + bit (i_a - i_b))   (two Beaver products, one round),
so ties keep the lower index, as ``numpy.argmax`` does, and the winner of a subtree is the
first maximum of a contiguous index range. Sampling is the Gumbel-max trick: the client adds
``T * g_i`` (g_i i.i.d. Gumbel(0, 1), from the client's own seeded generator) and the public
``logit_bias`` to ITS share of the logits before the tree (local, no communication), so
argmax(l + T g + bias) is a sample of softmax((l + bias) / T) (Gumbel 1954; Maddison et al.
2014), with the plaintext ``Sampler``'s distribution; T = 0 is greedy.

Steps (``argmax_last``; x: shares of (..., V) values at any fixed-point scale, |x| < 2^40):
  1. leaves: (x_j, j + offset); the index shares are a public constant (client: value, server: 0);
  2. ceil(log2 V) levels: one DReLU batch over the adjacent pairs, then one Beaver round for the
     two selections; an odd last candidate passes up unchanged;
  3. (``pick``, several workers) each worker's winner (m_w, i_w) is a leaf of one more tree on the
     worker that holds the ends; the winners stay shared: the server's shares move only inside the
     server's cluster, the client's only on the client;
  4. ``open_to_client``: the server sends its share of the final index; the client adds its own.
Who learns what: the client learns the token id only; the server learns nothing (every opening
inside DReLU and Beaver is uniform in Z_t). Neither learns a logit, a comparison bit or a rank.
Cost per row of V: V - 1 DReLU and 2 (V - 1) products (82 triples + 1 solved-bits item per
DReLU, 2 triples per selection pair); ceil(log2 V) x (8 + 1) rounds, plus one for the opening
(with the dealer's DCF keys: ceil(log2 V) x (1 + 1) + 1, no triples for the DReLU).
Measured (scripts/bench_reveal.py, docs/bench/reveal.json): V = 4096: 109 rounds, 4.2 MB sent per
party, 344k triples; V = 50257: 145 rounds, 51 MB per party, 4.2M triples.
"""
from __future__ import annotations

import numpy as np

from ..field import add, sub
from .arith import mul_ss, public
from .compare import drelu

BAN_OFFSET = 1 << 39  # a banned token's logit share is lowered by this (below any real logit at 2^24)


def encode_shift(fp, offsets: np.ndarray) -> np.ndarray:
    """The client's shift of its logit shares (``Sampler.token_offsets``) as field elements at the
    logits' scale 2^2f; a banned token (-inf) is pushed BAN_OFFSET below every real logit."""
    banned = np.isneginf(offsets)
    shift = fp.encode(np.where(banned, 0.0, offsets), scale_bits=2 * fp.frac_bits)
    return np.mod(shift - banned * np.int64(BAN_OFFSET), fp.t)


def _tree(p, x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        a, b, ia, ib = x[..., 0:2 * h:2], x[..., 1:2 * h:2], idx[..., 0:2 * h:2], idx[..., 1:2 * h:2]
        bit = drelu(p, sub(a, b, p.t))
        both = mul_ss(p, np.concatenate([bit, bit], -1), np.concatenate([sub(a, b, p.t), sub(ia, ib, p.t)], -1))
        m, i = add(b, both[..., :h], p.t), add(ib, both[..., h:], p.t)
        x = np.concatenate([m, x[..., 2 * h:]], -1)
        idx = np.concatenate([i, idx[..., 2 * h:]], -1)
    return x[..., 0], idx[..., 0]


def argmax_last(p, x: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shares of (max, first index of the max + offset) along the last axis of shared x."""
    x = np.asarray(x, np.int64)
    p.check(x)
    idx = public(p, np.broadcast_to(np.arange(x.shape[-1], dtype=np.int64) + offset, x.shape))
    return _tree(p, x, idx)


def argmax_pairs(p, values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same tree over candidates whose indices are already shared (the workers' winners,
    in increasing index order along the last axis)."""
    values, indices = np.asarray(values, np.int64), np.asarray(indices, np.int64)
    p.check(values, indices)
    return _tree(p, values, indices)


def open_to_client(p, index: np.ndarray):
    """The server sends its index share; the client returns the token id(s) (at least 1-d), the
    server None."""
    index = np.atleast_1d(np.asarray(index, np.int64))  # scalars travel as (1,)
    if p.is_client:
        other = p.chan.recv(shape=index.shape, dtype=np.int64)
        p.check(other)
        return np.mod(index + other, p.t)
    p.chan.send(index)
    return None
