"""The client's side of secure generation, on the user's machine (``remote.py`` runs it over TLS).

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
from cryptogen.he.kvcache import KVShares
from cryptogen.model import GPTConfig
from cryptogen.mpc.argmax import argmax_last, argmax_pairs, encode_shift, open_to_client
from cryptogen.mpc.compare import trunc
from cryptogen.mpc.gelu import gelu
from cryptogen.mpc.layernorm import layernorm
from cryptogen.sampling import Sampler, SamplingConfig
from cryptogen.twoparty import (PROBS_EXTRA_BITS, kv_append_client, kv_prefill_client, linear_many_client,
                                scores_client, scores_prefill_client, softmax_heads, values_client,
                                values_prefill_client)


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
        self.x_c = None
        self.partials: list[np.ndarray] = []
        self.kv: dict[tuple[int, int], KVShares] = {}  # (layer, the group's first head in the model) -> own k, v shares
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(shard_plan.workers)))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # ---- stages (same order and names as ServerShard; ``parties``: worker -> Party) ------
    def embed(self, parties: dict, start: int, T: int) -> None:
        """Encrypted one-hots of the tokens, to each worker for its embedding row shards (in parallel)."""
        tokens = self.tokens[start:start + T]
        if len(tokens) != T or not all(0 <= t < self.cfg.vocab_size for t in tokens):
            raise ValueError(f"token ids {start}..{start + T - 1} are missing or outside [0, {self.cfg.vocab_size})")
        self.start, self.T = start, T
        plan, owners = sp.embed_plan(self.cfg, self.n), sp.embed_owners(self.cfg, self.plan)
        onehots = [sp.embed_onehot_shards(self.cfg, t, self.n) for t in tokens]  # [token][shard]

        def one(w):
            x = np.zeros((T, self.cfg.n_embd), np.int64)
            for i in owners[w]:
                x = f_add(x, self._linear(parties[w], plan, np.stack([oh[i] for oh in onehots])), self.fp.t)
            return x
        futures = [self._pool.submit(one, w) for w in parties]
        self.x_c, self.partials = futures[0].result(), [fut.result() for fut in futures[1:]]

    def layernorm(self, parties: dict, rows: str = "all") -> None:
        """Residual add, then LN; ``rows`` "last": the last position only (the final LN when generating)."""
        (p,) = parties.values()
        self._residual()
        x = self.x_c[-1:] if rows == "last" else self.x_c
        self.h_c = layernorm(p, x, eps=self.cfg.layer_norm_epsilon, x_range=self.cfg.ln_range)

    def attention(self, parties: dict, layer: int, start: int) -> None:
        self.partials = self._fan_out(parties, layer, lambda p, s: self._attention_one(p, s, start))

    def mlp(self, parties: dict, layer: int) -> None:
        self.partials = self._fan_out(parties, layer, lambda p, s: self._mlp_one(p, s))

    def head(self, parties: dict, reveal: str = "logits") -> None:
        """LM head on each worker's vocabulary columns (in parallel). ``reveal`` "logits": the
        logits are opened to the client only, which samples the next token when generating.
        "token": the client shifts its logit shares by the sampler's public bias and Gumbel noise
        (``Sampler.token_offsets``), and a 2PC argmax (mpc/argmax.py) opens only the token id."""
        cols = sp.head_columns(self.cfg, self.plan)
        order = sorted(parties, key=lambda w: cols[w])
        if reveal == "token":
            self._token_head(parties, cols, order)
            return

        def one(w):
            p = parties[w]
            logits_c = self._linear(p, sp.head_plan(self.cfg, self.n, cols[w]), self.h_c)
            logits_s = p.chan.recv(shape=logits_c.shape, dtype=np.int64)
            p.check(logits_s)  # field elements only
            return f_add(logits_c, logits_s, self.fp.t)
        futures = [self._pool.submit(one, w) for w in order]
        logits = self.fp.decode(np.concatenate([f.result() for f in futures], axis=1), 2 * self.fp.frac_bits)
        self.logit_history.extend(logits)
        last = self.start + self.T - 1
        if last == len(self.tokens) - 1:  # generating: sample the next token (scoring: nothing to do)
            self.tokens.append(self.sampler(logits[-1]))

    def _token_head(self, parties: dict, cols: dict, order: list) -> None:
        shift = encode_shift(self.fp, self.sampler.token_offsets(self.cfg.vocab_size))  # bias, T x Gumbel

        def one(w):
            p, (lo, hi) = parties[w], cols[w]
            logits_c = self._linear(p, sp.head_plan(self.cfg, self.n, cols[w]), self.h_c[-1:])[-1]
            best = argmax_last(p, f_add(logits_c, shift[lo:hi], self.fp.t), offset=lo)
            return open_to_client(p, best[1]) if len(order) == 1 else np.stack(best)
        futures = [self._pool.submit(one, w) for w in order]
        results = [f.result() for f in futures]
        if len(order) == 1:
            self._append_token(results[0])
        else:
            self._winners = np.stack(results, -1)  # (2, workers): shares of each worker's (max, index)

    def pick(self, parties: dict) -> None:
        """Token-only output over several workers: the argmax of the workers' winners (on the ends
        worker's link); only the token id is opened, to the client."""
        (p,) = parties.values()
        self._append_token(open_to_client(p, argmax_pairs(p, self._winners[0], self._winners[1])[1]))

    def _append_token(self, token) -> None:
        token = int(np.asarray(token).reshape(-1)[0])
        if not 0 <= token < self.cfg.vocab_size:
            raise ValueError(f"the token-only output opened {token}, outside the vocabulary: the parties are out of step")
        self.tokens.append(token)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]

    # ---- per-worker halves ----------------------------------------------------------------
    def _attention_one(self, p, shard, start: int) -> np.ndarray:
        lay = sp.layer_layouts(self.cfg, len(shard.heads), shard.ff_width, self.n)
        f, dh, nh, T = self.fp.frac_bits, self.cfg.d_head, len(shard.heads), self.h_c.shape[0]
        fw = f + sp.WEIGHT_EXTRA_BITS  # the layers' weights' scale (secure_plan)
        qkv = trunc(p, self._linear(p, lay.qkv, self.h_c), fw)
        Q, K, V = qkv.reshape(T, 3, nh, dh).transpose(1, 0, 2, 3)  # each (T, heads, d_head)
        groups = sp.head_groups(nh, dh)  # the worker's KV-cache head groups
        kv = [self.kv_shares(shard.layer, shard.heads[a], b - a) for a, b in groups]
        scores = np.concatenate([self._scores(p, kv[g], start, Q[:, a:b], K[:, a:b], V[:, a:b])
                                 for g, (a, b) in enumerate(groups)])
        probs = softmax_heads(p, trunc(p, scores, f), start)  # (heads, T, start+T)
        ctx = np.concatenate([self._values(p, kv[g], start, probs[a:b]) for g, (a, b) in enumerate(groups)])
        ctx = trunc(p, ctx.transpose(1, 0, 2).reshape(T, nh * dh), f + PROBS_EXTRA_BITS)
        return trunc(p, self._linear(p, lay.o, ctx), fw)

    def _mlp_one(self, p, shard) -> np.ndarray:
        lay = sp.layer_layouts(self.cfg, len(shard.heads), shard.ff_width, self.n)
        fw = self.fp.frac_bits + sp.WEIGHT_EXTRA_BITS
        h = trunc(p, self._linear(p, lay.fc1, self.h_c), fw)
        return trunc(p, self._linear(p, lay.fc2, gelu(p, h)), fw)

    def _linear(self, p, plan, X_c) -> np.ndarray:
        return linear_many_client(p.chan, self.role, plan, X_c)

    def kv_shares(self, layer: int, first_head: int, heads: int) -> KVShares:
        """The client's own shares of a head group's cached k and v (its attention terms: he/arcc.py)."""
        key = (layer, first_head)
        if key not in self.kv:
            self.kv[key] = KVShares(sp.kv_layout(self.cfg, self.n, heads))
        return self.kv[key]

    def assume_zero_cache(self, positions: int) -> None:
        """Benchmarks only (scripts/bench_network.py --mode filled): the server's caches start with
        ``positions`` encryptions of zero and zero shares; the client's own shares of them are zeros."""
        for layer in range(self.cfg.n_layer):
            for _, shard in self.plan.owners(layer):
                for a, b in sp.head_groups(len(shard.heads), self.cfg.d_head):
                    zeros = np.zeros((positions, b - a, self.cfg.d_head), np.int64)
                    self.kv_shares(layer, shard.heads[a], b - a).write(0, zeros, zeros)

    def _scores(self, p, kv: KVShares, start, Q, K, V) -> np.ndarray:
        """One head group's KV write and scores: Q, K, V (T, heads, d_head) -> (heads, T, start+T)."""
        if Q.shape[0] == 1:
            kv_append_client(p.chan, self.role, kv, start, K[0], V[0])
            return scores_client(p.chan, self.role, kv, start + 1, Q[0])[:, None]
        kv_prefill_client(p.chan, self.role, kv, start, K, V)
        return scores_prefill_client(p.chan, self.role, kv, start, Q)

    def _values(self, p, kv: KVShares, start, P) -> np.ndarray:
        """One head group's p.V: P (heads, T, start+T) -> (heads, T, d_head)."""
        if P.shape[1] == 1:
            return values_client(p.chan, self.role, kv, start + 1, P[:, 0])[:, None]
        return values_prefill_client(p.chan, self.role, kv, start, P)

    def _fan_out(self, parties: dict, layer: int, fn) -> list[np.ndarray]:
        owners = self.plan.owners(layer)
        futures = [self._pool.submit(fn, parties[w], shard) for w, shard in owners]
        return [fut.result() for fut in futures]

    def _residual(self) -> None:
        for part in self.partials:
            self.x_c = f_add(self.x_c, part, self.fp.t)
        self.partials = []
