"""The server's side of secure generation for one worker (no Ray here; ``actor.py`` wraps it).

A worker holds, for every layer its ``WorkerPlan`` gives it, the plaintext weight shards
of its heads and feed-forward columns (encoded once as HE plaintexts), the encrypted KV
cache of its heads per session, and runs the server role of each stage against the client
over a ``Party`` (channel + correlated randomness). It is built from a *public* HE context
only: it holds no key that opens a ciphertext.

Stages (the names are the metric labels; cryptogen/driver.py calls them in this order):
  embed      token one-hot (encrypted by the client) x this worker's embedding row shards
             -> partial residual share (+ positions on the ends worker)
  layernorm  LN with the server's private gamma/beta (2PC), on the layer's lead worker
             (the final LN on the ends worker)
  attention  qkv linear -> truncate -> KV append -> q.K^T -> softmax -> p.V -> W_o rows
  mlp        c_fc columns -> truncate -> GELU (2PC) -> c_proj rows -> truncate
  head       tied LM head on this worker's vocabulary columns; logit shares opened to the client only,
             or (token-only output) a 2PC argmax over them
  pick       token-only output over several workers: the argmax of their winners; the token id
             is opened to the client only
Residual adds are local: the lead sums the partial shares of the owners.
"""
from __future__ import annotations

import numpy as np

from cryptogen import secure_plan as sp
from cryptogen.he import required_rotation_steps, serialize
from cryptogen.he.engine import ServerEngine, exports_of
from cryptogen.he.errors import SerializationError
from cryptogen.he.keys import PublicContext
from cryptogen.he.params import HEConfig
from cryptogen.he.kvcache import EncryptedKVCache
from cryptogen.he.linear import EncodedLinear, plan_linear
from cryptogen.he.stats import HEStats
from cryptogen.model import GPT
from cryptogen.mpc.argmax import argmax_last, argmax_pairs, open_to_client
from cryptogen.mpc.compare import trunc
from cryptogen.mpc.gelu import gelu
from cryptogen.mpc.layernorm import layernorm
from cryptogen.plan import WorkerPlan
from cryptogen.twoparty import (PROBS_EXTRA_BITS, kv_append_server, kv_prefill_server, linear_many_server,
                                scores_prefill_server, scores_server, softmax_heads, values_prefill_server,
                                values_server)

from .weights import model_weights


class SessionError(KeyError):
    """Unknown or already closed generation session."""


class ServerShard:
    def __init__(self, model: GPT, plan: WorkerPlan, public_context: bytes | None, holds_ends: bool,
                 lead_layers=frozenset(), he_config: HEConfig | None = None, embed_shards=None, head_cols=None,
                 key_share: int = 1):
        """``public_context``: None in a long-lived server (the weights are encoded once with the
        server's own key-less encoding context; each session brings the client's public context to
        ``open_session``), or one client's public context (in-process tests: every session uses it).
        ``he_config``: the server's own parameters (default ``HEConfig()``); a public context made
        with any other (e.g. weaker noise flooding) is rejected. ``embed_shards`` / ``head_cols``:
        this worker's embedding row shards and LM-head columns (default: all of them if it holds
        the ends, as with one worker)."""
        self.cfg = model.config
        self.key_share = key_share  # workers exporting under one session key (each gets 1/key_share of its budget)
        self.he_config = he_config or HEConfig()
        self.stats = HEStats()
        self.fp = self.he_config.fixed_point
        self.plan, self.n = plan, self.he_config.n
        if embed_shards is None:
            embed_shards = range(len(sp.embed_shards(self.cfg))) if holds_ends else ()
        if head_cols is None and holds_ends:
            head_cols = (0, self.cfg.vocab_size)
        self.head_cols, self.single_head = head_cols, head_cols == (0, self.cfg.vocab_size)
        self.embed_idx = tuple(embed_shards)
        self.weights = model_weights(model, plan, self.fp, holds_ends, frozenset(lead_layers),
                                     self.embed_idx, head_cols)
        plans = {name: plan_linear(*w.shape, self.n) for name, w in self.weights.encodable().items()}
        # the linear layers', decode and batched prefill (attention rotates nothing: he/arcc.py)
        self.required_steps = required_rotation_steps(plans.values())
        self.giant_steps = set().union(*(pl.giant_steps() for pl in plans.values()))  # he/hoist.py
        if public_context is None:
            self.ctx = PublicContext.for_encoding(self.he_config)
        else:  # its giant steps' keys too, as a session's (``open_session``)
            self.ctx = PublicContext.from_bytes(public_context, self.he_config, self.giant_steps)
        self.ctx.assert_public()
        self.engine = ServerEngine(self.ctx, self.stats, key_share)  # encodes the weights (and serves sessions in tests)
        self.linears = {name: EncodedLinear(self.engine, w, plans[name]) for name, w in self.weights.encodable().items()}
        self.sessions: dict[str, dict] = {}

    # ---- sessions -----------------------------------------------------------------
    def open_session(self, sid: str, public_context: bytes | None = None) -> None:
        """A session's evaluator: the client's public context (checked against the server's own
        parameters, public-only, with every Galois key the kernels use), or the shard's own."""
        if public_context is None:
            if self.ctx.encoding_only:
                raise SessionError("a session needs the client's public context")
            engine = self.engine
        else:
            ctx = PublicContext.from_bytes(public_context, self.he_config, self.giant_steps)
            ctx.assert_public()
            missing = self.required_steps - set(ctx.rotation_steps)
            if missing:
                raise SessionError(f"the client's public context lacks {len(missing)} Galois keys the kernels use")
            engine = ServerEngine(ctx, self.stats, self.key_share)
        self.sessions[sid] = {"engine": engine, "caches": {}}

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    # ---- per-step checkpoints (workers/actor.py; the gateway keeps them, RELIABILITY.md) --------
    def checkpoint(self, sid: str, serial: int, base: int | None = None) -> tuple[dict, bool, int]:
        """The session's encrypted KV cache per (layer, head group) as bytes, this key's export count,
        and whether it is whole: only what changed since checkpoint ``base`` when that is the last one
        this session wrote or restored (``EncryptedKVCache.delta_bytes``), else every cache whole.
        The checkpoint is numbered ``serial`` (the gateway's)."""
        session = self._session(sid)
        whole = base is None or session.get("saved") != base
        blobs = {}
        for (layer, group), c in session["caches"].items():
            delta = None if whole else c.delta_bytes()
            blobs[f"{layer}/{group}"] = c.to_bytes() if delta is None else delta
            c.mark_saved()
        session["saved"] = serial
        return blobs, whole, exports_of(session["engine"].ctx.key_id)

    def key_id(self, sid: str) -> bytes:
        return self._engine(sid).ctx.key_id

    def restore(self, sid: str, chain: list[dict], serial: int | None = None) -> None:
        """Replace the session's cache by a checkpoint's: a whole one and the deltas after it, oldest
        first (each checked against the session's key); nothing changes on an error."""
        session = self._session(sid)
        caches = {}
        for blobs in chain:
            for key, data in blobs.items():
                layer, group = (int(v) for v in key.split("/"))
                if serialize.kind_of(data) != "kv_delta":
                    caches[(layer, group)] = EncryptedKVCache.from_bytes(session["engine"], data)
                elif (layer, group) in caches:
                    caches[(layer, group)].apply_delta(data)
                else:
                    raise SerializationError(f"a checkpoint's delta of cache {key} has no whole cache before it")
        for c in caches.values():
            c.mark_saved()
        session["caches"], session["saved"] = caches, serial

    def reset_cache(self, sid: str) -> None:
        session = self._session(sid)
        session["caches"].clear()
        session["saved"] = None  # the next checkpoint is whole

    def _session(self, sid: str) -> dict:
        if sid not in self.sessions:
            raise SessionError(f"unknown session {sid!r}")
        return self.sessions[sid]

    def _engine(self, sid: str) -> ServerEngine:
        return self._session(sid)["engine"]

    def _cache(self, sid: str, layer: int, group: int, heads: int) -> EncryptedKVCache:
        session = self._session(sid)
        caches, key = session["caches"], (layer, group)
        if key not in caches:
            caches[key] = EncryptedKVCache(session["engine"], self.cfg.d_head, layer, group, heads)
        return caches[key]

    def cache_stats(self, sid: str | None = None) -> dict:
        sessions = list(self.sessions.values()) if sid is None else [self._session(sid)]
        cts = sum(c.ciphertext_count() for s in sessions for c in s["caches"].values())
        nbytes = sum(c.nbytes() for s in sessions for c in s["caches"].values())
        return {"ciphertexts": cts, "bytes": nbytes}

    # ---- stages (tokens start .. start+T-1; T == 1 uses the decode encodings) -------------
    def embed(self, p, sid: str, start: int, T: int) -> dict:
        """Encrypted one-hots x this worker's wte row shards; the ends worker adds public wpe[positions]
        and returns the residual share "x", the others a partial "o" (summed by the next LN)."""
        x_s = np.zeros((T, self.cfg.n_embd), np.int64)
        for i in self.embed_idx:
            enc = self.linears[f"embed{i}"]  # one-hots are integers: the product is at scale 2^f
            x_s = np.mod(x_s + self._linear(p, sid, enc, np.zeros((T, enc.plan.d_in), np.int64)), self.fp.t)
        if self.weights.wpe is None:
            return {"o": x_s}
        return {"x": np.mod(x_s + self.weights.wpe[start:start + T], self.fp.t)}

    def layernorm(self, p, sid: str, layer: int | None, which: str, rows: str, x: dict, *partials: dict) -> dict:
        """Residual add of the owners' partial shares, then LN (gamma/beta private); ``which`` "ln_f"
        is the final LN, ``rows`` "last" normalises the last position only (generation)."""
        x_s = self._residual(x, partials)
        gamma, beta = self.weights.ln_f if which == "ln_f" else self.weights.layer(layer).ln[which]
        h_in = x_s[-1:] if rows == "last" else x_s
        return {"x": x_s, "h": layernorm(p, h_in, gamma, beta, eps=self.cfg.layer_norm_epsilon,
                                         x_range=self.cfg.ln_range)}

    def attention(self, p, sid: str, layer: int, start: int, ln: dict) -> dict:
        lw, f, fw = self.weights.layer(layer), self.fp.frac_bits, self.fp.frac_bits + sp.WEIGHT_EXTRA_BITS
        T, nh, dh = ln["h"].shape[0], len(lw.heads), self.cfg.d_head
        qkv = trunc(p, self._linear(p, sid, self.linears[f"qkv{layer}"], ln["h"], lw.b_qkv), fw)
        Q, K, V = qkv.reshape(T, 3, nh, dh).transpose(1, 0, 2, 3)  # each (T, heads, d_head)
        groups = sp.head_groups(nh, dh)  # heads sharing KV-cache ciphertexts (secure_plan)
        caches = [self._cache(sid, layer, g, b - a) for g, (a, b) in enumerate(groups)]
        scores = np.concatenate([self._scores(p, sid, c, start, Q[:, a:b], K[:, a:b], V[:, a:b])
                                 for c, (a, b) in zip(caches, groups)])
        probs = softmax_heads(p, trunc(p, scores, f), start)  # (heads, T, start+T)
        ctx = np.concatenate([self._values(p, sid, c, start, probs[a:b])
                              for c, (a, b) in zip(caches, groups)])  # (heads, T, dh)
        ctx = trunc(p, ctx.transpose(1, 0, 2).reshape(T, nh * dh), f + PROBS_EXTRA_BITS)
        return {"o": trunc(p, self._linear(p, sid, self.linears[f"o{layer}"], ctx, lw.b_o), fw)}

    def mlp(self, p, sid: str, layer: int, ln: dict) -> dict:
        lw, fw = self.weights.layer(layer), self.fp.frac_bits + sp.WEIGHT_EXTRA_BITS
        h = trunc(p, self._linear(p, sid, self.linears[f"fc1{layer}"], ln["h"], lw.b_fc1), fw)
        g = gelu(p, h)
        return {"o": trunc(p, self._linear(p, sid, self.linears[f"fc2{layer}"], g, lw.b_fc2), fw)}

    def head(self, p, sid: str, ln: dict, reveal: str = "logits") -> dict:
        """The tied LM head on this worker's vocabulary columns. ``reveal`` "logits": sends the
        server's logit shares to the client (opened to the client only); "token": the logits stay
        shared and a 2PC argmax (mpc/argmax.py) over these columns keeps only the winner's shares,
        opened (the index only, to the client) here if this worker has the whole vocabulary, else
        passed to ``pick`` on the ends worker."""
        logits_s = self._linear(p, sid, self.linears["head"], ln["h"])
        if reveal != "token":
            p.chan.send(logits_s)
            return {}
        best = argmax_last(p, logits_s[-1], offset=self.head_cols[0])
        if self.single_head:
            open_to_client(p, best[1])
            return {}
        return {"best": np.stack(best)}

    def pick(self, p, sid: str, *heads: dict) -> dict:
        """Token-only output over several workers: the argmax of their winners (server shares,
        passed inside the server's cluster, in vocabulary order); the index is opened to the client."""
        best = np.stack([h["best"] for h in heads], -1)  # (2, workers)
        open_to_client(p, argmax_pairs(p, best[0], best[1])[1])
        return {}

    # ---- kernels: decode (one token) or prefill (many) ----------------------------------
    def _linear(self, p, sid, enc, X_s, bias=None) -> np.ndarray:
        """The decode encoding per token also in prefill, the T tokens in one round trip: it needs
        the same ct x pt per token as the lane-packed prefill encoding at full occupancy, and far
        fewer at small T (docs/DESIGN-NOTES.md, "Prefill")."""
        return linear_many_server(p.chan, self._engine(sid), enc, X_s, bias)

    def _scores(self, p, sid, cache, start, Q, K, V) -> np.ndarray:
        """One head group: Q, K, V (T, heads, d_head) -> score shares (heads, T, start+T)."""
        if Q.shape[0] == 1:
            kv_append_server(p.chan, cache, start, K[0], V[0])
            return scores_server(p.chan, self._engine(sid), cache, Q[0])[:, None]
        kv_prefill_server(p.chan, cache, start, K, V)
        return scores_prefill_server(p.chan, self._engine(sid), cache, start, Q)

    def _values(self, p, sid, cache, start, P) -> np.ndarray:
        """One head group: P (heads, T, start+T) -> (heads, T, d_head)."""
        if P.shape[1] == 1:
            return values_server(p.chan, self._engine(sid), cache, P[:, 0])[:, None]
        return values_prefill_server(p.chan, self._engine(sid), cache, start, P)

    def _residual(self, x: dict, partials) -> np.ndarray:
        x_s = x["x"]
        for part in partials:
            x_s = np.mod(x_s + part["o"], self.fp.t)
        return x_s
