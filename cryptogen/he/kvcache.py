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
Who learns what: server sees ciphertexts and the (public) token count. Cost per append:
two ciphertexts client->server, 4 additions; memory 2 * ct_bytes / tpc per token per group.
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


class EncryptedKVCache:
    """Server: one head group's encrypted K and V for one layer (``group``: its index in the layer)."""

    def __init__(self, engine: ServerEngine, d_head: int, layer: int = 0, group: int = 0, heads: int = 1):
        self.engine, self.layout = engine, KVLayout(d_head, engine.config.n, heads)
        self.layer, self.group = layer, group
        self.k: list[Cipher] = []
        self.v: list[Cipher] = []
        self.length = 0

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
        self.length += K_server.shape[0]

    # ---- accounting / persistence ------------------------------------------
    def ciphertext_count(self) -> int:
        return len(self.k) + len(self.v)

    def nbytes(self) -> int:
        return sum(len(c.ct.to_bytes("none")) for c in self.k + self.v)

    def to_bytes(self) -> bytes:
        ctx = self.engine.ctx
        meta = {"d_head": self.layout.d_head, "heads": self.layout.heads, "length": self.length,
                "layer": self.layer, "group": self.group,
                "k_budget": [c.budget for c in self.k], "v_budget": [c.budget for c in self.v]}
        blobs = [c.ct.to_bytes("none") for c in self.k + self.v]
        return serialize.pack("kv_cache", ctx.config.fingerprint, ctx.key_id, meta, serialize.join_blobs(blobs))

    @classmethod
    def from_bytes(cls, engine: ServerEngine, data: bytes) -> "EncryptedKVCache":
        ctx = engine.ctx
        meta, payload, _, _ = serialize.unpack(data, "kv_cache", ctx.config.fingerprint, ctx.key_id)
        try:
            cache = cls(engine, int(meta["d_head"]), int(meta["layer"]), int(meta["group"]), int(meta["heads"]))
        except (KeyError, TypeError, ValueError, ShapeError) as exc:
            raise SerializationError("kv cache metadata lacks a valid head-group layout") from exc
        blobs = serialize.split_blobs(payload)
        nk = len(meta["k_budget"])
        expected = -(-int(meta["length"]) // cache.layout.tpc)
        if nk != expected or len(blobs) != 2 * nk or len(meta["v_budget"]) != nk:
            raise SerializationError("kv cache metadata does not match its ciphertext count")
        try:
            cts = [PyCtxt(pyfhel=ctx.he, bytestring=b) for b in blobs]
        except Exception as exc:
            raise SerializationError("kv cache ciphertext rejected by SEAL") from exc
        budgets = list(meta["k_budget"]) + list(meta["v_budget"])
        cache.k = [Cipher(c, float(b)) for c, b in zip(cts[:nk], budgets[:nk])]
        cache.v = [Cipher(c, float(b)) for c, b in zip(cts[nk:], budgets[nk:])]
        cache.length = int(meta["length"])
        return cache
