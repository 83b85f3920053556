"""ARCC kernels: autoregressive ciphertext-ciphertext attention over the encrypted KV cache
(CryptoGen 2026 §ARCC), for a head group, with the folds done in the share domain and the
ciphertext products replaced by ct x pt with shares each party keeps.

A cache holds a group of heads per token block (kvcache.py: head h at offset h * d_head of
a ``width = heads * d_head`` block), so every step below serves all the group's heads at once.
Client-side layouts (applied by each party to its own share before S2H):
  * ``query_slots(layout, q)``: q (heads, d_head) replicated into every token block;
  * ``probs_slots(layout, p, c)``: p[h, token] (p: (heads, T)) over head h's d_head slots of
    token's block, for cache ct c.
Each party keeps its own shares of the cached keys and values (kvcache.KVShares), so the products
need no ciphertext x ciphertext (docs/HE.md, "Attention by ct x pt"). With q = q_c + q_s, k = k_c + k_s:
  q.k = q_s.Enc(k) + Enc(q_c).k_s + q_c.k_c
        (server, ct x pt) (server, ct x pt) (client, in the clear: its own shares)
Decode q K^T:
  1. client: Enc(q_c in ``query_slots``) -> server (the server does not add its share);
  2. server, per cache ciphertext K_c: Enc(k)_c * pt(q_s replicated) + Enc(q_c) * pt(k_s of K_c's
     tokens, ``cipher_slots``), one multiply-accumulate in the NTT domain and one inverse NTT per
     output, no relinearisation. Slot s of block b holds the cross terms of q[s] * k_{c*tpc+b}[s];
  3. H2S; each party sums a head's d_head slots in its share (``read_scores``); the client adds
     ``local_scores`` = q_c . k_c.
Decode p V:
  1. client: Enc(p_c in ``probs_slots(.., c)``) per cache ciphertext;
  2. server: sum_c Enc(v)_c * pt(p_s,c) + Enc(p_c,c) * pt(v_s of V_c's tokens), one output;
  3. H2S; each party sums the token blocks (``read_pv``); the client adds ``local_pv`` = p_c . v_c.
Folds in the share domain: neither product is folded under HE. It goes to H2S as it is, and
each party sums the slots in its own share. H2S masks every slot with a uniform r, so the unfolded
slots tell the client nothing; a sum of shares is a share of the sum. This saves the log2 d_head
(q.K^T, per K ciphertext) and log2(n / width) (p.V) rotations of a server-side fold, and
their noise (docs/HE.md, "Folds in the share domain").
Prefill (causal, all pairs): the same per query token i against cache ciphertexts
c <= i // tpc; entries j > i are masked later by the 2PC softmax (p.V: both parties' terms over
the same tokens, ``pv_span``).
Noise: before each product the static estimate is checked (ct x pt, rule 3); if the result could
not be flooded and sent, the cache operand is refreshed through the client (lazy refresh).
Who learns what: server sees ciphertexts and its own shares only; outputs leave through H2S
(masked); the client's own term uses only shares it sent itself.
Cost per decoded token per head group with T cached tokens: 2 * ceil(T / tpc) ct x pt in the NTT
domain (the cache ciphertexts' NTT forms and the server shares' plaintexts kept while they live;
the newest one's remade after each append), 2L inverse NTTs per output, no rotation and no
relinearisation, ceil(T / tpc) + 1 exports. The client's term: 2 * T * width multiplications.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..field import matmul
from . import threads
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


# ---------------- the client's own terms ----------------------------------------------
def local_scores(q_c, K_c, t: int) -> np.ndarray:
    """Client: its term q_c . k_c, (heads, length), from its query share (heads, d_head) and its kept
    key shares (length, heads, d_head)."""
    K_c = np.asarray(K_c, np.int64)
    return matmul(K_c.transpose(1, 0, 2), np.asarray(q_c, np.int64)[:, :, None], t)[..., 0]


def local_pv(p_c, V_c, t: int) -> np.ndarray:
    """Client: its term p_c . v_c, (heads, d_head), from its probability shares (heads, length) and its
    kept value shares (length, heads, d_head)."""
    V_c = np.asarray(V_c, np.int64)
    return matmul(np.asarray(p_c, np.int64)[:, None, :], V_c.transpose(1, 0, 2), t)[:, 0, :]


def pv_span(layout: KVLayout, start: int, i: int, length: int) -> int:
    """Prefill: the tokens query start+i's p.V covers (its cache ciphertexts 0 .. (start+i)//tpc); both
    parties' terms must cover the same ones (the masked probabilities are shares of 0, not zeros)."""
    return min(((start + i) // layout.tpc + 1) * layout.tpc, length)


# ---------------- noise checks ---------------------------------------------------
def _fits(e: ServerEngine, *budgets: float) -> bool:
    return e.noise.can_send(e.noise.add(*[e.noise.after_ct_pt(b) for b in budgets]))


def _refresh_cache(e: ServerEngine, store: list[Cipher], i: int, client: ClientRole | None, what: str) -> None:
    if client is None:
        raise NoiseBudgetError(f"{what}: cache ciphertext {i} needs a refresh but no client channel was given")
    store[i] = refresh(e, store[i], client)


def _check_k(e: ServerEngine, cache: EncryptedKVCache, q_c: Cipher, need: int, client, what: str) -> None:
    for i in range(need):
        if not _fits(e, q_c.budget, cache.k[i].budget):
            _refresh_cache(e, cache.k, i, client, what)
            if not _fits(e, q_c.budget, cache.k[i].budget):
                raise NoiseBudgetError(f"{what}: the query ciphertext itself has too little budget")


def _check_v(e: ServerEngine, cache: EncryptedKVCache, ps_c: list[Cipher], client, what: str) -> None:
    vs = cache.v[:len(ps_c)]
    while not _fits(e, *[p.budget for p in ps_c], *[v.budget for v in vs]):
        i = min(range(len(vs)), key=lambda j: cache.v[j].budget)
        if cache.v[i].budget >= e.noise.fresh:
            raise NoiseBudgetError(f"{what}: too many cache ciphertexts for one fold; shard the sequence")
        _refresh_cache(e, cache.v, i, client, what)
        vs = cache.v[:len(ps_c)]


# ---------------- server: the cross terms ------------------------------------------
def _qk_row(e: ServerEngine, cache: EncryptedKVCache, q_c: Cipher, q_s, need: int) -> list[Cipher]:
    """Enc(k)_c * q_s + Enc(q_c) * k_s,c for cache ciphertexts c < need (q_c, q_s in the query layout)."""
    lay = cache.layout
    qs_slots = query_slots(lay, q_s)
    q_form = e.ct_form(q_c)
    qs_form = None if q_form is None else e.pt_form(qs_slots, q_form.shape[1])
    forms = [cache.forms("k", c) for c in range(need)]

    def product(c: int) -> Cipher:  # on the HE threads (he/threads.py); counted below
        kf, ksf = forms[c]
        ks_slots = lay.cipher_slots(cache.shares.rows("k", c))
        return e.dot_ct_pt([(cache.k[c], qs_slots, kf, qs_form), (q_c, ks_slots, q_form, ksf)], count=False)
    out = threads.map_tasks(product, range(need))
    for _ in out:
        e.count_dot(2)
    return out


def _pv_row(e: ServerEngine, cache: EncryptedKVCache, ps_c: list[Cipher], p_s) -> Cipher:
    """sum_c Enc(v)_c * p_s,c + Enc(p_c,c) * v_s,c over c < len(ps_c) (``p_s``: (heads, T))."""
    lay, terms = cache.layout, []
    for c, pc in enumerate(ps_c):
        vf, vsf = cache.forms("v", c)
        terms.append((cache.v[c], probs_slots(lay, p_s, c), vf, None))
        terms.append((pc, lay.cipher_slots(cache.shares.rows("v", c)), None, vsf))
    return e.dot_ct_pt(terms)


# ---------------- decode ---------------------------------------------------------
def qk_decode(e: ServerEngine, cache: EncryptedKVCache, q_c: Cipher, q_s, client: ClientRole | None = None) -> list[Cipher]:
    """Server: the cross terms of q.K^T, one unfolded ciphertext per K ciphertext, from the client's
    Enc(q_c) (``query_slots``) and the server's share q_s (heads, d_head). The client adds its own
    term (``local_scores``) to its share after ``read_scores``."""
    if cache.length == 0:
        raise ShapeError("attention over an empty KV cache")
    _check_k(e, cache, q_c, len(cache.k), client, "q.K^T")
    return _qk_row(e, cache, q_c, q_s, len(cache.k))


def pv_decode(e: ServerEngine, cache: EncryptedKVCache, ps_c: list[Cipher], p_s,
              client: ClientRole | None = None) -> Cipher:
    """Server: the cross terms of p.V summed over the cache ciphertexts, from the client's
    ``ps_c[c]`` = Enc(p_c in ``probs_slots(.., c)``) and the server's share p_s (heads, length). The
    client adds ``local_pv`` to its share after ``read_pv``."""
    if len(ps_c) != len(cache.v):
        raise ShapeError(f"p.V needs {len(cache.v)} probability ciphertexts, got {len(ps_c)}")
    _check_v(e, cache, ps_c, client, "p.V")
    return _pv_row(e, cache, ps_c, p_s)


# ---------------- prefill --------------------------------------------------------
def qk_prefill(e: ServerEngine, cache: EncryptedKVCache, qs_c: list[Cipher], Q_s, start: int = 0,
               client: ClientRole | None = None) -> list[list[Cipher]]:
    """Server: for query token start+i (``qs_c[i]`` = Enc(q_c,i) in ``query_slots`` layout, ``Q_s[i]``
    the server's share), the cross terms against cache ciphertexts 0 .. (start+i)//tpc (causal)."""
    lay = cache.layout
    if start + len(qs_c) > cache.length or len(Q_s) != len(qs_c):
        raise ShapeError(f"{len(qs_c)} queries ({len(Q_s)} server shares) from position {start} do not fit "
                         f"the cache length {cache.length}")
    out = []
    for i, q in enumerate(qs_c):
        need = (start + i) // lay.tpc + 1
        _check_k(e, cache, q, need, client, "prefill q.K^T")
        out.append(_qk_row(e, cache, q, Q_s[i], need))
    return out


def pv_prefill(e: ServerEngine, cache: EncryptedKVCache, ps_c: list[list[Cipher]], P_s, start: int = 0,
               client: ClientRole | None = None) -> list[Cipher]:
    """Server: query start+i's cross terms from ``ps_c[i][c]`` = Enc(probs_slots(p_c,i, c)) for
    c <= (start+i)//tpc and the server's shares P_s (heads, T, start+T); one unfolded ciphertext per
    query (read with ``read_pv``; the client adds ``local_pv`` over ``pv_span``)."""
    lay, out = cache.layout, []
    P_s = np.asarray(P_s)
    for i, row in enumerate(ps_c):
        need = (start + i) // lay.tpc + 1
        if len(row) != need:
            raise ShapeError(f"query {start + i} needs {need} probability ciphertexts, got {len(row)}")
        _check_v(e, cache, row, client, "prefill p.V")
        out.append(_pv_row(e, cache, row, P_s[:, i]))
    return out
