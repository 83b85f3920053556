"""The client's side of secure generation (no Ray here; ``actor.py`` wraps it).

The client holds the secret key, its shares of every activation, the token ids and the
logits; it never holds a weight. Each stage mirrors ``workers/shard.py`` step for step
over one ``Party`` per worker link. Stages that several workers serve (attention, mlp)
run the per-worker halves in threads, so the workers' ciphertext work overlaps.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cryptogen import secure_plan as sp
from cryptogen.field import add as f_add
from cryptogen.he.convert import ClientRole
from cryptogen.he.keys import ClientKeys
from cryptogen.model import GPTConfig
from cryptogen.mpc.compare import trunc
from cryptogen.mpc.gelu import gelu
from cryptogen.mpc.layernorm import layernorm
from cryptogen.mpc.softmax import softmax
from cryptogen.sampling import Sampler, SamplingConfig
from cryptogen.twoparty import kv_append_client, linear_client, scores_client, values_client


class ClientSession:
    """One generation: the client's shares and state between stages."""

    def __init__(self, cfg: GPTConfig, shard_plan, keys: ClientKeys, prompt_ids: list[int],
                 sampler: Sampler | None = None):
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.cfg, self.plan = cfg, shard_plan
        self.tokens = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.sampler = sampler or Sampler(SamplingConfig())
        self.logit_history: list[np.ndarray] = []
        self.role = ClientRole(keys)
        self.n = keys.config.n
        self.fp = keys.config.fixed_point
        self.layout = sp.kv_layout(cfg, self.n)
        self.x_c = None
        self.partials: list[np.ndarray] = []
        self.length = 0  # tokens in the server's cache for this session
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(shard_plan.workers)))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # ---- stages (same order and names as ServerShard; ``parties``: worker -> Party) ------
    def embed(self, parties: dict, position: int) -> None:
        (p,) = parties.values()
        token = self.tokens[position]
        if not 0 <= token < self.cfg.vocab_size:
            raise ValueError(f"token id out of range [0, {self.cfg.vocab_size})")
        plan = sp.embed_plan(self.cfg, self.n)
        x_c = np.zeros(self.cfg.n_embd, np.int64)
        for onehot in sp.embed_onehot_shards(self.cfg, token, self.n):
            x_c = f_add(x_c, linear_client(p.chan, self.role, plan, onehot), self.fp.t)
        self.x_c, self.partials = x_c, []

    def layernorm(self, parties: dict) -> None:
        (p,) = parties.values()
        self._residual()
        self.h_c = layernorm(p, self.x_c[None], eps=self.cfg.layer_norm_epsilon)[0]

    def attention(self, parties: dict, layer: int, position: int) -> None:
        self.partials = self._fan_out(parties, layer, lambda p, s: self._attention_one(p, layer, s, position))

    def mlp(self, parties: dict, layer: int) -> None:
        self.partials = self._fan_out(parties, layer, lambda p, s: self._mlp_one(p, layer, s))

    def head(self, parties: dict) -> int:
        """Final LN, LM head, logits opened to the client only; samples the next token."""
        (p,) = parties.values()
        self._residual()
        h = layernorm(p, self.x_c[None], eps=self.cfg.layer_norm_epsilon)[0]
        logits_c = linear_client(p.chan, self.role, sp.head_plan(self.cfg, self.n), h)
        logits_s = p.chan.recv(shape=(self.cfg.vocab_size,))
        logits = self.fp.decode(f_add(logits_c, logits_s, self.fp.t), 2 * self.fp.frac_bits)
        self.logit_history.append(logits)
        token = self.sampler(logits)
        self.tokens.append(token)
        return token

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    # ---- per-worker halves ----------------------------------------------------------------
    def _attention_one(self, p, layer: int, shard, position: int) -> np.ndarray:
        lay = sp.layer_layouts(self.cfg, len(shard.heads), shard.ff_width, self.n)
        f, dh, nh = self.fp.frac_bits, self.cfg.d_head, len(shard.heads)
        q, k, v = trunc(p, linear_client(p.chan, self.role, lay.qkv, self.h_c), f).reshape(3, nh, dh)
        for i in range(nh):
            kv_append_client(p.chan, self.role, self.layout, position, k[i], v[i])
        length = position + 1
        scores = np.stack([scores_client(p.chan, self.role, self.layout, length, q[i]) for i in range(nh)])
        probs = softmax(p, trunc(p, scores, f))
        ctx = np.concatenate([values_client(p.chan, self.role, self.layout, length, probs[i]) for i in range(nh)])
        ctx = trunc(p, ctx, f)
        return trunc(p, linear_client(p.chan, self.role, lay.o, ctx), f)

    def _mlp_one(self, p, layer: int, shard) -> np.ndarray:
        lay = sp.layer_layouts(self.cfg, len(shard.heads), shard.ff_width, self.n)
        f = self.fp.frac_bits
        h = trunc(p, linear_client(p.chan, self.role, lay.fc1, self.h_c), f)
        g = gelu(p, h)
        return trunc(p, linear_client(p.chan, self.role, lay.fc2, g), f)

    def _fan_out(self, parties: dict, layer: int, fn) -> list[np.ndarray]:
        owners = self.plan.owners(layer)
        futures = [self._pool.submit(fn, parties[w], shard) for w, shard in owners]
        return [fut.result() for fut in futures]

    def _residual(self) -> None:
        for part in self.partials:
            self.x_c = f_add(self.x_c, part, self.fp.t)
        self.partials = []
