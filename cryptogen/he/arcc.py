"""ARCC kernels: autoregressive ciphertext-ciphertext attention over the encrypted KV cache
(CryptoGen 2026 §ARCC; rotate-and-add folds as in Halevi-Shoup/BOLT), for a head group.

A cache holds a group of heads per token block (kvcache.py: head h at offset h * d_head of
a ``width = heads * d_head`` block), so every step below serves all the group's heads at once.
Client-side layouts (applied by each party to its own share before S2H):
  * ``query_slots(layout, q)``: q (heads, d_head) replicated into every token block;
  * ``probs_slots(layout, p, c)``: p[h, token] (p: (heads, T)) over head h's d_head slots of
    token's block, for cache ct c.
Decode q K^T (server):
  1. per cache ciphertext K_c: Enc(q_rep) * K_c (1 ct x ct + relin);
  2. window-sum of width d_head (log2 d_head + popcount - 1 rotations): the score of head h
     for token c*tpc + b lands in slot h * d_head of block b. Output: one ciphertext per K_c -> H2S.
Decode p V (server):
  1. sum_c Enc(p_c) * V_c (one ct x ct per cache ciphertext);
  2. window-sum over the blocks of a row (stride width), then add the row-swapped copy:
     out[h, j] lands in slot h * d_head + j (log2(n / width) rotations in total). Output: one
     ciphertext. Below tpc tokens the fold covers only the used blocks (``pv_fold``): up to
     tpr tokens ceil(log2 T) rotations and no row swap.
Prefill (causal, all pairs): the same per query token i against cache ciphertexts
c <= i // tpc; entries j > i are masked later by the 2PC softmax.
Noise: before each product the static estimate is checked; if the result could not be
flooded and sent, the cache operand is refreshed through the client (lazy refresh).
Who learns what: server sees ciphertexts only; outputs leave through H2S (masked).
Cost per decoded token per head group with T cached tokens: 2 * ceil(T / tpc) ct x ct,
ceil(T / tpc) * log2(d_head) + log2(n / width) rotations (p.V: ceil(log2 T) for T <= tpr),
ceil(T / tpc) + 1 exports -- the same as one head's when the group fits one ciphertext.
"""
from __future__ import annotations

import numpy as np

from .convert import ClientRole, refresh
from .engine import Cipher, ServerEngine
from .errors import NoiseBudgetError, ShapeError
from .kvcache import EncryptedKVCache, KVLayout


# ---------------- layouts (both parties) ---------------------------------------
def query_slots(layout: KVLayout, q) -> np.ndarray:
    """q (heads, d_head) in every token block."""
    q = layout.flat(q, "query")
    out = np.zeros(layout.n, np.int64)
    for b in range(layout.tpc):
        s = layout.block_start(b)
        out[s:s + layout.width] = q
    return out


def probs_slots(layout: KVLayout, p, c: int) -> np.ndarray:
    """Slots for cache ciphertext c: p[h, c*tpc + b] repeated over head h's slots of block b
    (``p``: (heads, T); a 1-D p is one head's)."""
    p = np.asarray(p, np.int64)
    p = p[None] if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[0] != layout.heads:
        raise ShapeError(f"probabilities must have shape ({layout.heads}, T), got {p.shape}")
    out = np.zeros(layout.n, np.int64)
    for b, vals in enumerate(p[:, c * layout.tpc:(c + 1) * layout.tpc].T):
        s = layout.block_start(b)
        out[s:s + layout.width] = np.repeat(vals, layout.d_head)
    return out


def probs_cts_needed(layout: KVLayout, length: int) -> int:
    return -(-length // layout.tpc)


def read_scores(layout: KVLayout, slot_arrays: list[np.ndarray], length: int) -> np.ndarray:
    """Scores (or their shares), (heads, length), for tokens 0..length-1 from qk outputs."""
    out = np.zeros((layout.heads, length), np.int64)
    heads = np.arange(layout.heads) * layout.d_head
    for p in range(length):
        out[:, p] = slot_arrays[p // layout.tpc][layout.block_start(p % layout.tpc) + heads]
    return out


def read_pv(layout: KVLayout, slots: np.ndarray) -> np.ndarray:
    """The p.V output, (heads, d_head)."""
    return np.asarray(slots[: layout.width], np.int64).reshape(layout.heads, layout.d_head)


# ---------------- noise checks ---------------------------------------------------
def _fold_steps(width: int) -> int:
    return max(0, width.bit_length() - 1) + bin(width).count("1") - 1


def _fits_qk(e: ServerEngine, lay: KVLayout, q: Cipher, k: Cipher) -> bool:
    b = e.noise.after_ct_ct(q.budget, k.budget)
    return e.noise.can_send(e.noise.after_fold(b, _fold_steps(lay.d_head)))


def pv_fold(lay: KVLayout, length: int) -> tuple[int, bool]:
    """The p.V fold over ``length`` cached tokens: (blocks summed per row, add the swapped row?).

    Probabilities of tokens not yet cached are zero, so only the blocks that hold tokens need
    summing: up to tpr tokens all sit in row 0 (no row swap), and while one ciphertext holds
    them all the fold narrows to the next power of two of its used blocks (rotation steps
    2^j * width, a subset of the full fold's keys). From tpr + 1 tokens the rows are added;
    from tpc + 1 every block is used."""
    used = min(length, lay.tpr)
    width = 1 << max(0, used - 1).bit_length()
    return (width if width < lay.tpr else lay.tpr), length > lay.tpr


def _pv_budget(e: ServerEngine, lay: KVLayout, ps: list[Cipher], vs: list[Cipher], length: int) -> float:
    b = e.noise.add(*[e.noise.after_ct_ct(p.budget, v.budget) for p, v in zip(ps, vs)])
    width, swap = pv_fold(lay, length)
    return e.noise.after_fold(b, _fold_steps(width) + swap)


def _pv_fold(e: ServerEngine, lay: KVLayout, acc: Cipher, length: int) -> Cipher:
    width, swap = pv_fold(lay, length)
    acc = e.window_sum(acc, width, lay.width)
    return e.add_ct_ct(acc, e.swap_rows(acc)) if swap else acc


def _refresh_cache(e: ServerEngine, store: list[Cipher], i: int, client: ClientRole | None, what: str) -> None:
    if client is None:
        raise NoiseBudgetError(f"{what}: cache ciphertext {i} needs a refresh but no client channel was given")
    store[i] = refresh(e, store[i], client)


# ---------------- decode ---------------------------------------------------------
def qk_decode(e: ServerEngine, cache: EncryptedKVCache, q: Cipher, client: ClientRole | None = None) -> list[Cipher]:
    """Server: Enc(q . k_p) for every cached token p (one ciphertext per K ciphertext)."""
    if cache.length == 0:
        raise ShapeError("attention over an empty KV cache")
    lay, out = cache.layout, []
    for i in range(len(cache.k)):
        if not _fits_qk(e, lay, q, cache.k[i]):
            _refresh_cache(e, cache.k, i, client, "q.K^T")
            if not _fits_qk(e, lay, q, cache.k[i]):
                raise NoiseBudgetError("q.K^T: the query ciphertext itself has too little budget")
        out.append(e.window_sum(e.mul_ct_ct(q, cache.k[i]), lay.d_head, 1))
    return out


def pv_decode(e: ServerEngine, cache: EncryptedKVCache, ps: list[Cipher], client: ClientRole | None = None) -> Cipher:
    """Server: Enc(sum_p p[h, p] v_p[h]) in slots h * d_head + j; ``ps[c]`` in ``probs_slots(.., c)``."""
    lay = cache.layout
    if len(ps) != len(cache.v):
        raise ShapeError(f"p.V needs {len(cache.v)} probability ciphertexts, got {len(ps)}")
    while not e.noise.can_send(_pv_budget(e, lay, ps, cache.v, cache.length)):
        i = min(range(len(cache.v)), key=lambda j: cache.v[j].budget)
        if cache.v[i].budget >= e.noise.fresh:
            raise NoiseBudgetError("p.V: too many cache ciphertexts for one fold; shard the sequence")
        _refresh_cache(e, cache.v, i, client, "p.V")
    return _pv_fold(e, lay, e.sum([e.mul_ct_ct(p, v) for p, v in zip(ps, cache.v)]), cache.length)


# ---------------- prefill --------------------------------------------------------
def qk_prefill(e: ServerEngine, cache: EncryptedKVCache, qs: list[Cipher], start: int = 0,
               client: ClientRole | None = None) -> list[list[Cipher]]:
    """Server: for query token start+i (``qs[i]`` in ``query_slots`` layout), score
    ciphertexts against cache ciphertexts 0 .. (start+i)//tpc (causal)."""
    lay = cache.layout
    if start + len(qs) > cache.length:
        raise ShapeError(f"{len(qs)} queries from position {start} exceed the cache length {cache.length}")
    out = []
    for i, q in enumerate(qs):
        row = []
        for c in range((start + i) // lay.tpc + 1):
            if not _fits_qk(e, lay, q, cache.k[c]):
                _refresh_cache(e, cache.k, c, client, "prefill q.K^T")
            row.append(e.window_sum(e.mul_ct_ct(q, cache.k[c]), lay.d_head, 1))
        out.append(row)
    return out


def pv_prefill(e: ServerEngine, cache: EncryptedKVCache, ps: list[list[Cipher]], start: int = 0,
               client: ClientRole | None = None) -> list[Cipher]:
    """Server: output of query start+i from ``ps[i][c] = probs_slots(layout, p_i, c)`` for
    c <= (start+i)//tpc; one ciphertext per query (out[h, j] in slot h * d_head + j)."""
    lay, out = cache.layout, []
    for i, row in enumerate(ps):
        need = (start + i) // lay.tpc + 1
        if len(row) != need:
            raise ShapeError(f"query {start + i} needs {need} probability ciphertexts, got {len(row)}")
        while not e.noise.can_send(_pv_budget(e, lay, row, cache.v[:need], start + i + 1)):
            j = min(range(need), key=lambda m: cache.v[m].budget)
            if cache.v[j].budget >= e.noise.fresh:
                raise NoiseBudgetError("prefill p.V: too many cache ciphertexts for one fold")
            _refresh_cache(e, cache.v, j, client, "prefill p.V")
        out.append(_pv_fold(e, lay, e.sum([e.mul_ct_ct(p, v) for p, v in zip(row, cache.v)]), start + i + 1))
    return out
