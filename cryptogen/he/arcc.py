"""ARCC kernels: autoregressive ciphertext-ciphertext attention over the encrypted KV cache
(CryptoGen 2026 §ARCC), for a head group, with the folds done in the share domain.

A cache holds a group of heads per token block (kvcache.py: head h at offset h * d_head of
a ``width = heads * d_head`` block), so every step below serves all the group's heads at once.
Client-side layouts (applied by each party to its own share before S2H):
  * ``query_slots(layout, q)``: q (heads, d_head) replicated into every token block;
  * ``probs_slots(layout, p, c)``: p[h, token] (p: (heads, T)) over head h's d_head slots of
    token's block, for cache ct c.
Decode q K^T (server):
  1. per cache ciphertext K_c: Enc(q_rep) * K_c (1 ct x ct + relin). Slot s of block b holds
     q[s] * k_{c*tpc+b}[s]; the score of head h is the sum of head h's d_head slots.
Decode p V (server):
  1. sum_c Enc(p_c) * V_c (one ct x ct per cache ciphertext, not relinearised: the 3-polynomial
     sum is relinearised once, by the export). Slot h*d_head + j of block b
     holds sum_c p[h, c*tpc+b] v_{c*tpc+b}[h, j]; out[h, j] is the sum over the blocks b.
Folds in the share domain: neither product is folded under HE. It goes to H2S as it is, and
each party sums the slots in its own share (``read_scores``: a head's d_head slots;
``read_pv``: the tpc blocks). H2S masks every slot with a uniform r, so the unfolded slots
tell the client nothing; a sum of shares is a share of the sum. This saves the log2 d_head
(q.K^T, per K ciphertext) and log2(n / width) (p.V) rotations of a server-side fold, and
their noise (docs/HE.md, "Folds in the share domain").
Prefill (causal, all pairs): the same per query token i against cache ciphertexts
c <= i // tpc; entries j > i are masked later by the 2PC softmax.
Noise: before each product the static estimate is checked; if the result could not be
flooded and sent, the cache operand is refreshed through the client (lazy refresh).
Who learns what: server sees ciphertexts only; outputs leave through H2S (masked).
Cost per decoded token per head group with T cached tokens: 2 * ceil(T / tpc) ct x ct, no
rotation, ceil(T / tpc) + 1 exports -- the same as one head's when the group fits one ciphertext.
The products run through he/ctct.py where it is built: the query is base-extended once for all the
K ciphertexts, each cache ciphertext once while it lives (the newest one after each append), and the
p.V products are summed before one scaling (docs/BENCHMARKS.md "ct x ct by hand").
"""
from __future__ import annotations

from functools import lru_cache

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


@lru_cache(maxsize=64)
def _block_index(layout: KVLayout) -> np.ndarray:
    """(tpc, width) slot indices of every token block (computed once per layout)."""
    return np.array([layout.block_start(b) for b in range(layout.tpc)])[:, None] + np.arange(layout.width)


def _blocks(layout: KVLayout, slots: np.ndarray) -> np.ndarray:
    """(tpc, heads, d_head): every token block of one ciphertext's slots."""
    return np.asarray(slots, np.int64)[_block_index(layout)].reshape(layout.tpc, layout.heads, layout.d_head)


def read_scores(layout: KVLayout, slot_arrays: list[np.ndarray], length: int, t: int) -> np.ndarray:
    """Scores (or either party's shares), (heads, length), for tokens 0..length-1 from the q.K^T
    products: each head's d_head slots summed (slots < t, d_head * t < 2^63)."""
    sums = [np.mod(_blocks(layout, a).sum(axis=2), t) for a in slot_arrays]  # (tpc, heads) each
    return np.concatenate(sums)[:length].T.copy()


def read_pv(layout: KVLayout, slots: np.ndarray, t: int) -> np.ndarray:
    """The p.V output (or a share), (heads, d_head): the sum over the token blocks."""
    return np.mod(_blocks(layout, slots).sum(axis=0), t)


# ---------------- noise checks ---------------------------------------------------
def _fits_qk(e: ServerEngine, q: Cipher, k: Cipher) -> bool:
    return e.noise.can_send(e.noise.after_ct_ct(q.budget, k.budget))


def _pv_budget(e: ServerEngine, ps: list[Cipher], vs: list[Cipher]) -> float:
    return e.noise.add(*[e.noise.after_ct_ct(p.budget, v.budget) for p, v in zip(ps, vs)])


def _refresh_cache(e: ServerEngine, store: list[Cipher], i: int, client: ClientRole | None, what: str) -> None:
    if client is None:
        raise NoiseBudgetError(f"{what}: cache ciphertext {i} needs a refresh but no client channel was given")
    store[i] = refresh(e, store[i], client)


# ---------------- decode ---------------------------------------------------------
def qk_decode(e: ServerEngine, cache: EncryptedKVCache, q: Cipher, client: ClientRole | None = None) -> list[Cipher]:
    """Server: the q.K^T products, one unfolded ciphertext per K ciphertext (``read_scores`` sums
    each head's d_head slots of a token's block into its score)."""
    if cache.length == 0:
        raise ShapeError("attention over an empty KV cache")
    for i in range(len(cache.k)):
        if not _fits_qk(e, q, cache.k[i]):
            _refresh_cache(e, cache.k, i, client, "q.K^T")
            if not _fits_qk(e, q, cache.k[i]):
                raise NoiseBudgetError("q.K^T: the query ciphertext itself has too little budget")
    return e.mul_ct_ct_many(q, cache.k)


def pv_decode(e: ServerEngine, cache: EncryptedKVCache, ps: list[Cipher], client: ClientRole | None = None) -> Cipher:
    """Server: the unfolded p.V products, summed over the cache ciphertexts (``read_pv`` sums the
    blocks); ``ps[c]`` in ``probs_slots(.., c)``."""
    if len(ps) != len(cache.v):
        raise ShapeError(f"p.V needs {len(cache.v)} probability ciphertexts, got {len(ps)}")
    while not e.noise.can_send(_pv_budget(e, ps, cache.v)):
        i = min(range(len(cache.v)), key=lambda j: cache.v[j].budget)
        if cache.v[i].budget >= e.noise.fresh:
            raise NoiseBudgetError("p.V: too many cache ciphertexts for one fold; shard the sequence")
        _refresh_cache(e, cache.v, i, client, "p.V")
    return e.dot_ct_ct(ps, cache.v)  # relinearised once, at export


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
        need = (start + i) // lay.tpc + 1
        for c in range(need):
            if not _fits_qk(e, q, cache.k[c]):
                _refresh_cache(e, cache.k, c, client, "prefill q.K^T")
        out.append(e.mul_ct_ct_many(q, cache.k[:need]))
    return out


def pv_prefill(e: ServerEngine, cache: EncryptedKVCache, ps: list[list[Cipher]], start: int = 0,
               client: ClientRole | None = None) -> list[Cipher]:
    """Server: output of query start+i from ``ps[i][c] = probs_slots(layout, p_i, c)`` for
    c <= (start+i)//tpc; one unfolded ciphertext per query (read with ``read_pv``)."""
    lay, out = cache.layout, []
    for i, row in enumerate(ps):
        need = (start + i) // lay.tpc + 1
        if len(row) != need:
            raise ShapeError(f"query {start + i} needs {need} probability ciphertexts, got {len(row)}")
        while not e.noise.can_send(_pv_budget(e, row, cache.v[:need])):
            j = min(range(need), key=lambda m: cache.v[m].budget)
            if cache.v[j].budget >= e.noise.fresh:
                raise NoiseBudgetError("prefill p.V: too many cache ciphertexts for one fold")
            _refresh_cache(e, cache.v, j, client, "prefill p.V")
        out.append(e.dot_ct_ct(row, cache.v[:need]))
    return out
