"""The server's side of secure generation for one worker (no Ray here; ``actor.py`` wraps it).

A worker holds, for every layer its ``WorkerPlan`` gives it, the plaintext weight shards
of its heads and feed-forward columns (encoded once as HE plaintexts), the encrypted KV
cache of its heads per session, and runs the server role of each stage against the client
over a ``Party`` (channel + correlated randomness). It is built from a *public* HE context
only: it cannot decrypt.

Stages (the names are the metric labels; scheduler/driver.py calls them in this order):
  embed      token one-hot (encrypted by the client) x embedding table -> residual share
  layernorm  LN with the server's private gamma/beta (2PC), on the layer's lead worker
  attention  qkv linear -> truncate -> KV append -> q.K^T -> softmax -> p.V -> W_o rows
  mlp        c_fc columns -> truncate -> GELU (2PC) -> c_proj rows -> truncate
  head       final LN -> tied LM head; the logit shares are opened to the client only
Residual adds are local: the lead sums the partial shares of the owners.
"""
from __future__ import annotations

import numpy as np

from cryptogen import secure_plan as sp
from cryptogen.he.engine import ServerEngine
from cryptogen.he.keys import PublicContext
from cryptogen.he.kvcache import EncryptedKVCache
from cryptogen.he.linear import EncodedLinear
from cryptogen.he.stats import HEStats
from cryptogen.model import GPT
from cryptogen.mpc.compare import trunc
from cryptogen.mpc.gelu import gelu
from cryptogen.mpc.layernorm import layernorm
from cryptogen.mpc.softmax import softmax
from cryptogen.scheduler.plan import WorkerPlan
from cryptogen.twoparty import kv_append_server, linear_server, scores_server, values_server

from .weights import model_weights


class SessionError(KeyError):
    """Unknown or already closed generation session."""


class ServerShard:
    def __init__(self, model: GPT, plan: WorkerPlan, public_context: bytes, holds_ends: bool,
                 lead_layers=frozenset()):
        self.cfg = model.config
        self.ctx = PublicContext.from_bytes(public_context)
        self.ctx.assert_public()
        self.stats = HEStats()
        self.engine = ServerEngine(self.ctx, self.stats)
        self.fp = self.engine.config.fixed_point
        self.plan, self.n = plan, self.engine.config.n
        self.weights = model_weights(model, plan, self.fp, holds_ends, frozenset(lead_layers))
        self.linears = {name: EncodedLinear(self.engine, w) for name, w in self.weights.encodable().items()}
        self.sessions: dict[str, dict] = {}

    # ---- sessions -----------------------------------------------------------------
    def open_session(self, sid: str) -> None:
        self.sessions[sid] = {}

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def reset_cache(self, sid: str) -> None:
        self._session(sid).clear()

    def _session(self, sid: str) -> dict:
        if sid not in self.sessions:
            raise SessionError(f"unknown session {sid!r}")
        return self.sessions[sid]

    def _cache(self, sid: str, layer: int, head: int) -> EncryptedKVCache:
        caches = self._session(sid)
        key = (layer, head)
        if key not in caches:
            caches[key] = EncryptedKVCache(self.engine, self.cfg.d_head, layer, head)
        return caches[key]

    def cache_stats(self) -> dict:
        cts = sum(c.ciphertext_count() for s in self.sessions.values() for c in s.values())
        nbytes = sum(c.nbytes() for s in self.sessions.values() for c in s.values())
        return {"ciphertexts": cts, "bytes": nbytes}

    # ---- stages ---------------------------------------------------------------------
    def embed(self, p, sid: str, position: int) -> dict:
        """Encrypted one-hot x wte (row shards summed as ciphertexts), + public wpe[position]."""
        parts = [self.linears[f"embed{i}"] for i in range(len(sp.embed_shards(self.cfg)))]
        x_s = np.zeros(self.cfg.n_embd, np.int64)
        for enc in parts:  # each part: one ciphertext up, one down (scale 2^f: one-hot is integer)
            x_s = np.mod(x_s + linear_server(p.chan, self.engine, enc, np.zeros(enc.plan.d_in, np.int64)), self.fp.t)
        return {"x": np.mod(x_s + self.weights.wpe[position], self.fp.t)}

    def layernorm(self, p, sid: str, layer: int, which: str, x: dict, *partials: dict) -> dict:
        """Residual add of the owners' partial shares, then LN (gamma/beta private)."""
        x_s = self._residual(layer, which, x, partials)
        gamma, beta = self.weights.layer(layer).ln[which]
        return {"x": x_s, "h": layernorm(p, x_s[None], gamma, beta, eps=self.cfg.layer_norm_epsilon)[0]}

    def attention(self, p, sid: str, layer: int, position: int, ln: dict) -> dict:
        lw = self.weights.layer(layer)
        heads, dh = lw.heads, self.cfg.d_head
        qkv = trunc(p, linear_server(p.chan, self.engine, self.linears[f"qkv{layer}"], ln["h"], lw.b_qkv),
                    self.fp.frac_bits)
        q, k, v = qkv.reshape(3, len(heads), dh)
        caches = [self._cache(sid, layer, h) for h in heads]
        for i, cache in enumerate(caches):
            kv_append_server(p.chan, cache, position, k[i], v[i])
        scores = np.stack([scores_server(p.chan, self.engine, c, q[i]) for i, c in enumerate(caches)])
        probs = softmax(p, trunc(p, scores, self.fp.frac_bits))  # (heads, T)
        ctx = np.concatenate([values_server(p.chan, self.engine, c, probs[i]) for i, c in enumerate(caches)])
        ctx = trunc(p, ctx, self.fp.frac_bits)
        out = linear_server(p.chan, self.engine, self.linears[f"o{layer}"], ctx, lw.b_o)
        return {"o": trunc(p, out, self.fp.frac_bits)}

    def mlp(self, p, sid: str, layer: int, ln: dict) -> dict:
        lw = self.weights.layer(layer)
        h = trunc(p, linear_server(p.chan, self.engine, self.linears[f"fc1{layer}"], ln["h"], lw.b_fc1),
                  self.fp.frac_bits)
        g = gelu(p, h)
        out = linear_server(p.chan, self.engine, self.linears[f"fc2{layer}"], g, lw.b_fc2)
        return {"o": trunc(p, out, self.fp.frac_bits)}

    def head(self, p, sid: str, x: dict, *partials: dict) -> dict:
        """Final LN and the tied LM head; sends the server's logit share to the client."""
        x_s = self._residual(self.cfg.n_layer - 1, "ln_f", x, partials)
        gamma, beta = self.weights.ln_f
        h = layernorm(p, x_s[None], gamma, beta, eps=self.cfg.layer_norm_epsilon)[0]
        logits_s = linear_server(p.chan, self.engine, self.linears["head"], h)
        p.chan.send(logits_s)  # opening to the client only: the server learns nothing
        return {}

    def _residual(self, layer: int, which: str, x: dict, partials) -> np.ndarray:
        x_s = x["x"]
        for part in partials:
            x_s = np.mod(x_s + part["o"], self.fp.t)
        return x_s
