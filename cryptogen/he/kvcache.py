"""Encrypted KV cache with slot-aware concatenation (CryptoGen 2026 §encrypted KV cache).

Layout (public): per (layer, head group) a list of ciphertexts for K and one for V. A head
group is a run of one worker's heads of a layer (``secure_plan.head_groups``); a token's block
holds the group's heads side by side, ``width = heads * d_head`` contiguous slots (head h at
offset h * d_head). Each batching row holds ``tpr = (n/2) // width`` token blocks, so a
ciphertext holds ``tpc = 2 * tpr`` tokens. Token p lives in ciphertext p // tpc, block p % tpc.
Packing the heads makes one ciphertext product and one export serve all of them (per-head
caches needed one each: docs/HE.md, "Head groups"). The same layout serves decode and
prefill (ARCC kernels in arcc.py); nothing is ever re-encrypted to change layout.

Steps of a decode append at position p (no server-side rotation):
  1. client encrypts its shares k_c, v_c already placed at block p % tpc
     (``token_slots``) and sends two ciphertexts;
  2. server checks p == length (else CachePositionError, cache unchanged), adds its
     plaintext shares placed the same way, and adds the result into ciphertext p // tpc,
     or starts a new ciphertext when p % tpc == 0.
Prefill writes a run of tokens with one client ciphertext per touched cache ciphertext.
Shares kept beside the cache (docs/HE.md, "Attention by ct x pt"): each party also keeps its own share of
every cached k and v in plaintext (``KVShares``: the server's in the cache, the client's in its session),
so that the attention's products are ct x pt (arcc.py): q.k = q_s.Enc(k) + Enc(q_c).k_s + q_c.k_c.
Who learns what: server sees ciphertexts and the (public) token count; each party keeps only shares it
already held. Cost per append: two ciphertexts client->server, 4 additions; memory 2 * ct_bytes / tpc
plus 2 * width words per token per group (and each party's own shares, 2 * width words).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from Pyfhel import PyCtxt

from . import serialize
from .engine import Cipher, ServerEngine
from .errors import CachePositionError, SerializationError, ShapeError


@dataclass(frozen=True)
class KVLayout:
    d_head: int
    n: int
    heads: int = 1  # heads packed side by side in each token block

    def __post_init__(self):
        if self.heads < 1 or not 1 <= self.d_head * self.heads <= self.n // 2:
            raise ShapeError(f"{self.heads} head(s) of d_head={self.d_head} must fill between 1 and n/2 slots")

    @property
    def width(self) -> int:
        return self.heads * self.d_head

    @property
    def tpr(self) -> int:
        return (self.n // 2) // self.width

    @property
    def tpc(self) -> int:
        return 2 * self.tpr

    def block_start(self, block: int) -> int:
        return (block // self.tpr) * (self.n // 2) + (block % self.tpr) * self.width

    def flat(self, vec, what: str = "token vector") -> np.ndarray:
        """One token's (heads, d_head) values (or already flat, ``width``) as ``width`` values."""
        vec = np.asarray(vec, np.int64)
        if vec.shape not in ((self.width,), (self.heads, self.d_head)):
            raise ShapeError(f"{what} must have shape ({self.heads}, {self.d_head}), got {vec.shape}")
        return vec.reshape(self.width)

    def token_slots(self, position: int, vec) -> np.ndarray:
        """Slots with ``vec`` (heads, d_head) at the block of ``position`` (either party, own share)."""
        vec = self.flat(vec)
        out = np.zeros(self.n, np.int64)
        s = self.block_start(position % self.tpc)
        out[s:s + self.width] = vec
        return out

    def cipher_slots(self, mat) -> np.ndarray:
        """One cache ciphertext's slots from its tokens' rows ``mat`` (at most tpc, each (heads, d_head)
        or flat): token b of the ciphertext at block b, zeros after the last."""
        mat = np.asarray(mat, np.int64).reshape(-1, self.width)
        if mat.shape[0] > self.tpc:
            raise ShapeError(f"a ciphertext holds {self.tpc} tokens, got {mat.shape[0]}")
        out = np.zeros(self.n, np.int64)
        for b, vec in enumerate(mat):
            s = self.block_start(b)
            out[s:s + self.width] = vec
        return out

    def run_slots(self, start: int, mat) -> list[tuple[int, np.ndarray]]:
        """Prefill: [(ciphertext index, slots)] for tokens start .. start+T-1 (``mat``: (T, heads, d_head))."""
        mat = np.asarray(mat, np.int64)
        if mat.ndim not in (2, 3) or mat.shape[0] < 1:
            raise ShapeError(f"token matrix must have shape (T, {self.heads}, {self.d_head}), got {mat.shape}")
        out: dict[int, np.ndarray] = {}
        for i, vec in enumerate(mat):
            p = start + i
            slots = out.setdefault(p // self.tpc, np.zeros(self.n, np.int64))
            s = self.block_start(p % self.tpc)
            slots[s:s + self.width] = self.flat(vec, "each token's row")
        return sorted(out.items())


class KVShares:
    """One party's plaintext shares of a head group's cached k and v (each (length, heads, d_head) in
    Z_t), in a buffer that grows by doubling. ``write(start, ...)`` drops positions from ``start`` on
    first, so a step the parties redo after a retry overwrites its own earlier write."""

    def __init__(self, layout: KVLayout):
        self.layout, self.length = layout, 0
        self.dirty_from = 0  # rows from here on may differ from the last checkpoint's (``EncryptedKVCache.delta_bytes``)
        self._k = np.zeros((0, layout.heads, layout.d_head), np.int64)
        self._v = self._k.copy()

    @property
    def k(self) -> np.ndarray:
        return self._k[:self.length]

    @property
    def v(self) -> np.ndarray:
        return self._v[:self.length]

    def write(self, start: int, K, V) -> None:
        lay = self.layout
        K, V = (np.asarray(m, np.int64).reshape(-1, lay.heads, lay.d_head) for m in (K, V))
        if not 0 <= start <= self.length:
            raise CachePositionError(f"kv shares: write at position {start}, next free is {self.length}")
        if K.shape != V.shape:
            raise ShapeError(f"K share {K.shape} and V share {V.shape} differ")
        end = start + K.shape[0]
        if end > self._k.shape[0]:
            cap = max(end, 2 * self._k.shape[0], 16)
            grow = np.zeros((cap - self._k.shape[0], lay.heads, lay.d_head), np.int64)
            self._k, self._v = np.concatenate([self._k, grow]), np.concatenate([self._v, grow])
        self._k[start:end], self._v[start:end] = K, V
        self.length, self.dirty_from = end, min(self.dirty_from, start)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, int(length)))
        self.dirty_from = min(self.dirty_from, self.length)

    def rows(self, which: str, c: int) -> np.ndarray:
        """The rows of cache ciphertext c (``which``: "k" or "v")."""
        tpc = self.layout.tpc
        return (self.k if which == "k" else self.v)[c * tpc:(c + 1) * tpc]


class EncryptedKVCache:
    """Server: one head group's encrypted K and V for one layer (``group``: its index in the layer)."""

    def __init__(self, engine: ServerEngine, d_head: int, layer: int = 0, group: int = 0, heads: int = 1):
        self.engine, self.layout = engine, KVLayout(d_head, engine.config.n, heads)
        self.layer, self.group = layer, group
        self.k: list[Cipher] = []
        self.v: list[Cipher] = []
        self.length = 0
        self.shares = KVShares(self.layout)  # the server's own shares of the cached k and v
        self._forms: dict = {}  # (which, c) -> (the Cipher, its ct_form, its shares' pt_form): arcc.py
        self._saved: tuple[list, list] | None = None  # the K, V Cipher objects the last checkpoint holds

    def _check_position(self, position: int) -> None:
        if position != self.length:
            raise CachePositionError(
                f"layer {self.layer} head group {self.group}: write at position {position}, next free is {self.length}")

    def _write(self, store: list[Cipher], idx: int, c: Cipher) -> None:
        if idx == len(store):
            store.append(c)
        else:
            store[idx] = self.engine.add_ct_ct(store[idx], c)

    def append(self, position: int, k_client: bytes, k_server, v_client: bytes, v_server) -> None:
        """Decode append of one token (see module doc)."""
        self._check_position(position)
        lay, e = self.layout, self.engine
        ks, vs = lay.token_slots(position, k_server), lay.token_slots(position, v_server)
        kc, vc = e.receive(k_client), e.receive(v_client)  # validated before any change
        idx = position // lay.tpc
        self._write(self.k, idx, e.add_ct_pt(kc, ks))
        self._write(self.v, idx, e.add_ct_pt(vc, vs))
        self.shares.write(position, lay.flat(k_server, "K share")[None], lay.flat(v_server, "V share")[None])
        self.length += 1

    def prefill(self, start: int, k_client: list[bytes], K_server, v_client: list[bytes], V_server) -> None:
        """Write tokens start .. start+T-1; one client ciphertext per touched cache ciphertext."""
        self._check_position(start)
        K_server, V_server = np.asarray(K_server), np.asarray(V_server)
        if K_server.shape != V_server.shape:
            raise ShapeError(f"K share {K_server.shape} and V share {V_server.shape} differ")
        runs_k, runs_v = self.layout.run_slots(start, K_server), self.layout.run_slots(start, V_server)
        if len(k_client) != len(runs_k) or len(v_client) != len(runs_v):
            raise ShapeError(f"prefill of {K_server.shape[0]} tokens needs {len(runs_k)} client ciphertexts each for K, V")
        e = self.engine
        kcs, vcs = [e.receive(b) for b in k_client], [e.receive(b) for b in v_client]
        for (idx, ks), (_, vs), kc, vc in zip(runs_k, runs_v, kcs, vcs):
            self._write(self.k, idx, e.add_ct_pt(kc, ks))
            self._write(self.v, idx, e.add_ct_pt(vc, vs))
        self.shares.write(start, K_server, V_server)
        self.length += K_server.shape[0]

    def forms(self, which: str, c: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(ct_form of cache ciphertext c, pt_form of the server's shares in it) for arcc's ct x pt
        sums; kept while that ciphertext object lives (a write or a refresh replaces it) if the engine
        keeps preparations (``ServerEngine.keep_prepared``)."""
        store, e = (self.k if which == "k" else self.v), self.engine
        got = self._forms.get((which, c))
        if got is not None and got[0] is store[c]:
            return got[1], got[2]
        cf = e.ct_form(store[c])
        pf = None if cf is None else e.pt_form(self.layout.cipher_slots(self.shares.rows(which, c)), cf.shape[1])
        if e.keep_prepared:
            self._forms[(which, c)] = (store[c], cf, pf)
        return cf, pf

    # ---- accounting / persistence ------------------------------------------
    def ciphertext_count(self) -> int:
        return len(self.k) + len(self.v)

    def nbytes(self) -> int:
        """The ciphertexts' serialised size (SEAL's own count: nothing is serialised)."""
        return sum(c.ct.sizeof_ciphertext("none") for c in self.k + self.v)

    def to_bytes(self) -> bytes:
        ctx = self.engine.ctx
        meta = {"d_head": self.layout.d_head, "heads": self.layout.heads, "length": self.length,
                "layer": self.layer, "group": self.group,
                "k_budget": [c.budget for c in self.k], "v_budget": [c.budget for c in self.v]}
        blobs = [c.ct.to_bytes("none") for c in self.k + self.v]
        blobs += [np.ascontiguousarray(m, "<i8").tobytes() for m in (self.shares.k, self.shares.v)]
        return serialize.pack("kv_cache", ctx.config.fingerprint, ctx.key_id, meta, serialize.join_blobs(blobs))

    # ---- incremental checkpoints: what changed since the last one -----------
    # Every change of a cache ciphertext (an append's add, a prefill's write, a refresh) puts a new
    # ``Cipher`` object into ``k``/``v``; a checkpoint remembers the objects it holds, so the next one
    # carries only the ciphertexts that are not those objects any more, and the share rows from the
    # first one written since. A decode step touches one K and one V ciphertext per cache: the delta is
    # ~2 ciphertexts where the whole cache is 2 * ceil(length / tpc) (docs/RELIABILITY.md).
    def mark_saved(self) -> None:
        """The cache as it is now is what the last checkpoint holds (after ``to_bytes``, ``delta_bytes``
        or a restore)."""
        self._saved = (list(self.k), list(self.v))
        self.shares.dirty_from = self.length

    def delta_bytes(self) -> bytes | None:
        """The changes since ``mark_saved`` (``apply_delta`` on the saved cache gives this one), or None
        when there is no saved base to be relative to (then ``to_bytes``)."""
        if self._saved is None or len(self.k) < len(self._saved[0]) or len(self.v) < len(self._saved[1]):
            return None
        ki, vi = (_changed(now, old) for now, old in zip((self.k, self.v), self._saved))
        lo = min(self.shares.dirty_from, self.length)
        meta = {"layer": self.layer, "group": self.group, "length": self.length, "shares_from": lo,
                "k_index": ki, "v_index": vi, "k_budget": [self.k[i].budget for i in ki],
                "v_budget": [self.v[i].budget for i in vi]}
        blobs = [self.k[i].ct.to_bytes("none") for i in ki] + [self.v[i].ct.to_bytes("none") for i in vi]
        blobs += [np.ascontiguousarray(m[lo:], "<i8").tobytes() for m in (self.shares.k, self.shares.v)]
        ctx = self.engine.ctx
        return serialize.pack("kv_delta", ctx.config.fingerprint, ctx.key_id, meta, serialize.join_blobs(blobs))

    def apply_delta(self, data: bytes) -> None:
        """Bring this cache (as its last checkpoint had it) to a later checkpoint's state; checked
        against this cache's key, layout and length first (nothing changes on an error)."""
        ctx, lay, t = self.engine.ctx, self.layout, self.engine.config.t
        meta, payload, _, _ = serialize.unpack(data, "kv_delta", ctx.config.fingerprint, ctx.key_id)
        try:
            length, lo = int(meta["length"]), int(meta["shares_from"])
            ki, vi = [int(i) for i in meta["k_index"]], [int(i) for i in meta["v_index"]]
            budgets = [float(b) for b in list(meta["k_budget"]) + list(meta["v_budget"])]
            where = (int(meta["layer"]), int(meta["group"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError("kv cache delta metadata is incomplete") from exc
        nk = -(-length // lay.tpc)
        if where != (self.layer, self.group) or not 0 <= lo <= min(self.length, length):
            raise SerializationError("kv cache delta belongs to another cache or starts past its shares")
        for idx, store in ((ki, self.k), (vi, self.v)):
            if idx != sorted(set(idx)) or any(not 0 <= i < nk for i in idx) or \
                    not set(range(len(store), nk)) <= set(idx) or len(store) > nk:
                raise SerializationError("kv cache delta does not cover the cache's new ciphertexts")
        blobs = serialize.split_blobs(payload)
        if len(blobs) != len(ki) + len(vi) + 2 or len(budgets) != len(ki) + len(vi):
            raise SerializationError("kv cache delta metadata does not match its ciphertext count")
        rows = []
        for b in blobs[-2:]:
            m = np.frombuffer(b, "<i8")
            if m.size != (length - lo) * lay.width or (m.size and (m.min() < 0 or m.max() >= t)):
                raise SerializationError("kv cache delta shares do not match its length or are not field elements")
            rows.append(m.reshape(length - lo, lay.heads, lay.d_head))
        try:
            cts = [Cipher(PyCtxt(pyfhel=ctx.he, bytestring=b), bud) for b, bud in zip(blobs[:-2], budgets)]
        except Exception as exc:
            raise SerializationError("kv cache delta ciphertext rejected by SEAL") from exc
        k, v = list(self.k) + [None] * (nk - len(self.k)), list(self.v) + [None] * (nk - len(self.v))
        for i, c in zip(ki, cts[:len(ki)]):
            k[i] = c
        for i, c in zip(vi, cts[len(ki):]):
            v[i] = c
        self.shares.truncate(lo)
        self.shares.write(lo, *rows)
        self.k, self.v, self.length = k, v, length

    @classmethod
    def from_bytes(cls, engine: ServerEngine, data: bytes) -> "EncryptedKVCache":
        ctx = engine.ctx
        meta, payload, _, _ = serialize.unpack(data, "kv_cache", ctx.config.fingerprint, ctx.key_id)
        try:
            cache = cls(engine, int(meta["d_head"]), int(meta["layer"]), int(meta["group"]), int(meta["heads"]))
        except (KeyError, TypeError, ValueError, ShapeError) as exc:
            raise SerializationError("kv cache metadata lacks a valid head-group layout") from exc
        blobs = serialize.split_blobs(payload)
        nk, length = len(meta["k_budget"]), int(meta["length"])
        expected = -(-length // cache.layout.tpc)
        if nk != expected or len(blobs) != 2 * nk + 2 or len(meta["v_budget"]) != nk:
            raise SerializationError("kv cache metadata does not match its ciphertext and share count")
        lay, t = cache.layout, engine.config.t
        shares = []
        for b in blobs[-2:]:
            m = np.frombuffer(b, "<i8")
            if m.size != length * lay.width or (m.size and (m.min() < 0 or m.max() >= t)):
                raise SerializationError("kv cache shares do not match its length or are not field elements")
            shares.append(m.reshape(length, lay.heads, lay.d_head))
        cache.shares.write(0, *shares)
        blobs = blobs[:-2]
        try:
            cts = [PyCtxt(pyfhel=ctx.he, bytestring=b) for b in blobs]
        except Exception as exc:
            raise SerializationError("kv cache ciphertext rejected by SEAL") from exc
        budgets = list(meta["k_budget"]) + list(meta["v_budget"])
        cache.k = [Cipher(c, float(b)) for c, b in zip(cts[:nk], budgets[:nk])]
        cache.v = [Cipher(c, float(b)) for c, b in zip(cts[nk:], budgets[nk:])]
        cache.length = int(meta["length"])
        return cache


def _changed(now: list, old: list) -> list[int]:
    """Indices of ``now`` not holding the same object as ``old`` (new ones included)."""
    return [i for i, c in enumerate(now) if i >= len(old) or c is not old[i]]
