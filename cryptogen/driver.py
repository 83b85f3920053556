"""The stage sequence of secure prefill and decode steps, run by BOTH parties.

It reads like ``Block.forward``: each call to ``self.stage`` is one stage of the data flow
(DESIGN §3), and the stage names are the metric labels. It is a pure function of public facts
(model shape, shard plan, positions), so the server's gateway and the user's client each run it
with their own ``runner``: the server's ``RayRunner`` (scheduler/ray_runner.py) fans each stage
out to the worker actors and passes the server's shares between them as Ray refs inside the
server's cluster; the client's runner (client/remote.py) runs the client halves over the TLS
data links. ``InProcessRunner`` (scheduler/inprocess.py) runs both halves as threads, for tests.
The driver itself never sees a token, a share or a logit.

Modes: ``kv-reuse`` keeps the encrypted KV cache across steps; ``recompute`` (the BOLT-style
baseline) clears it and re-runs the whole prefix for every new token, on the same kernels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from cryptogen import secure_plan as sp

MODES = ("kv-reuse", "recompute")
REVEALS = ("token", "logits")  # what the client learns per generated position


class DriverError(ValueError):
    pass


@dataclass(frozen=True)
class StepTiming:
    position: int
    phase: str  # prefill | decode
    seconds: float
    offline_s: float = 0.0  # before the step: waiting for its correlated randomness (remote dealer)


class Driver:
    def __init__(self, runner, cfg, plan, mode: str = "kv-reuse", ends_worker: int = 0, reveal: str = "logits"):
        if mode not in MODES:
            raise DriverError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if reveal not in REVEALS:
            raise DriverError(f"unknown reveal {reveal!r}; choose one of {', '.join(REVEALS)}")
        self.last = "token" if reveal == "token" else "last"  # the ``logits`` of a generation pass
        self.r, self.cfg, self.plan, self.mode, self.ends = runner, cfg, plan, mode, ends_worker
        self.embedders = [w for w, shards in sp.embed_owners(cfg, plan).items() if shards]
        self.heads = list(sp.head_columns(cfg, plan))

    # ---- tokens start .. start+T-1 through the model ----------------------------------------
    def forward(self, start: int, T: int, logits: str | None) -> None:
        """One pass; ``logits``: None, "last" (generation; the client sees the last position's
        logits), "token" (generation; the client learns only the next token, mpc/argmax.py) or
        "all" (scoring)."""
        emb = self.stage("embed", self.embedders, client=(start, T), server=(start, T))
        x, partials = emb.pop(self.ends), list(emb.values())  # positions added on the ends worker
        for layer in range(self.cfg.n_layer):
            lead, owners = self.plan.lead(layer), [w for w, _ in self.plan.owners(layer)]
            x = self.stage("layernorm", [lead], client=("all",), server=(layer, "ln_1", "all", x, *partials))[lead]
            partials = self.stage("attention", owners, client=(layer, start), server=(layer, start, x))
            x = self.stage("layernorm", [lead], client=("all",),
                           server=(layer, "ln_2", "all", x, *partials.values()))[lead]
            partials = list(self.stage("mlp", owners, client=(layer,), server=(layer, x)).values())
        if logits:
            rows = "all" if logits == "all" else "last"
            reveal = "token" if logits == "token" else "logits"
            ln = self.stage("layernorm", [self.ends], client=(rows,), server=(None, "ln_f", rows, x, *partials))
            heads = self.stage("head", self.heads, client=(reveal,), server=(ln[self.ends], reveal))
            if reveal == "token" and len(self.heads) > 1:  # the workers' winners meet on the ends worker
                self.stage("pick", [self.ends], client=(), server=tuple(heads[w] for w in self.heads))
        self.r.step_done(start if T == 1 else None)  # a dealer's next items, between the steps

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        return self.r.stage(name, workers, client, server)

    # ---- generation ------------------------------------------------------------------------
    def prefill(self, n_prompt: int, chunk: int | None = None) -> StepTiming:
        """The prompt in one pass (prefill encodings, causal softmax), or in passes of ``chunk``
        tokens that each attend to the cache the earlier ones filled; fills the cache."""
        if not isinstance(n_prompt, int) or n_prompt < 1:
            raise DriverError(f"the prompt must have at least 1 token, got {n_prompt!r}")
        if chunk is not None and chunk < 1:
            raise DriverError(f"the prefill chunk must be at least 1 token, got {chunk}")
        t0 = time.perf_counter()
        step = chunk or n_prompt
        for start in range(0, n_prompt, step):
            self.extend(start, min(step, n_prompt - start), sample=start + step >= n_prompt)
        return StepTiming(n_prompt - 1, "prefill", time.perf_counter() - t0)

    def extend(self, start: int, T: int, sample: bool = True) -> StepTiming:
        """Tokens start .. start+T-1 (already in the client's session) into the encrypted cache
        after ``start`` cached ones, in one prefill pass; with ``sample`` the LM head runs and the
        client samples the next token."""
        if start + T > self.cfg.n_positions:
            raise DriverError(f"positions up to {start + T - 1} exceed the context of {self.cfg.n_positions}")
        t0 = time.perf_counter()
        self.forward(start, T, logits=self.last if sample else None)
        self.r.barrier()
        return StepTiming(start + T - 1, "prefill", time.perf_counter() - t0)

    def decode_one_token(self, position: int) -> StepTiming:
        """kv-reuse: one token against the encrypted cache. recompute: the cache is dropped and
        the whole prefix (position + 1 tokens) goes through prefill again, on the same kernels."""
        t0 = time.perf_counter()
        if self.mode == "recompute":
            self.r.reset_cache()
            self.forward(0, position + 1, logits=self.last)
        else:
            self.forward(position, 1, logits=self.last)
        self.r.barrier()
        return StepTiming(position, "decode", time.perf_counter() - t0)

    def score(self, n_tokens: int, on_step=None) -> list[StepTiming]:
        """Logits at every position of a given text (secure perplexity), in one prefill pass."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or not 1 <= n_tokens <= self.cfg.n_positions:
            raise DriverError(f"scoring needs 1..{self.cfg.n_positions} tokens (the model's context), got {n_tokens!r}")
        t0 = time.perf_counter()
        self.forward(0, n_tokens, logits="all")
        self.r.barrier()
        timings = [StepTiming(n_tokens - 1, "prefill", time.perf_counter() - t0)]
        if on_step:
            on_step(timings[-1])
        return timings

    def generate(self, n_prompt: int, max_new_tokens: int, on_step=None) -> list[StepTiming]:
        """Prefill, then decode steps; the client samples each token inside the ``head`` stage."""
        if n_prompt < 1:
            raise DriverError("the prompt is empty")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise DriverError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        if n_prompt + max_new_tokens - 1 > self.cfg.n_positions:
            raise DriverError(f"{n_prompt} prompt tokens + {max_new_tokens} new tokens exceed the context "
                              f"of {self.cfg.n_positions}")
        timings = [self.prefill(n_prompt)]
        if on_step:
            on_step(timings[-1])
        for i in range(1, max_new_tokens):
            timings.append(self.decode_one_token(n_prompt + i - 1))
            if on_step:
                on_step(timings[-1])
        return timings
