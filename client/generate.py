"""Secure generation from the user's process: start the client actor (client trust domain),
hand the server its public context, let the server's driver run the stages, and stream
the tokens the client actor samples.

In the embedded deployment the user's process is also the Ray driver, so both sides are
wired here; the boundary is kept in the code: the scheduler objects (``ServerPool``,
``Driver``) receive only the public context and public counts, and only this module reads
tokens or logits, from the client actor.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cryptogen.cluster.connect import connect
from cryptogen.he.params import HEConfig
from cryptogen.model import GPT
from cryptogen.sampling import SamplingConfig
from cryptogen.scheduler.driver import Driver, StepTiming
from cryptogen.scheduler.plan import make_plan
from cryptogen.scheduler.ray_runner import RayRunner, ServerPool

from .actor import ClientActor
from .metrics import MetricsPortInUse


@dataclass
class SecureResult:
    tokens: list[int]
    timings: list[StepTiming]
    logits: list = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)
    provider: str = "dealer"


class SecureGenerator:
    """A client + server pool on a Ray cluster; ``generate`` may be called for many prompts."""

    def __init__(self, model, workers: int = 1, mode: str = "kv-reuse", address: str | None = None,
                 provider: str = "dealer", layer_groups: int = 1, he_config: HEConfig | None = None,
                 metrics_port: int | None = None):
        connect(address)
        # ``model``: a checkpoint folder the server's workers load (the user's process reads only its
        # config.json), or a GPT object (tests and benchmarks: it passes through this process)
        self.cfg = GPT.read_config(model) if isinstance(model, (str, os.PathLike)) else model.config
        self.mode = mode
        self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, workers, layer_groups)
        self.he_config = he_config or HEConfig()
        here = ray.get_runtime_context().get_node_id()  # the client actor stays on the user's node
        self.client = ClientActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        ).remote(self.cfg, self.plan, self.he_config)
        self.metrics_port = None
        if metrics_port is not None:
            try:
                self.metrics_port = ray.get(self.client.start_metrics.remote(metrics_port))
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() if isinstance(e.cause, MetricsPortInUse) else e from None
        public = ray.get(self.client.public_context.remote())
        self.pool = ServerPool(model, self.plan, public, self.he_config, provider)

    def close(self) -> None:
        """Stop the client actor and the server pool (frees their CPUs)."""
        self.pool.shutdown()
        ray.kill(self.client)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def metrics_note(self) -> str:
        return f"; metrics at http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port is not None else ""

    def _observe(self, timing: StepTiming) -> None:
        """Public facts to the client actor's exporter: latency, workers' op counts and cache size."""
        snaps = ray.get([w.telemetry_snapshot.remote() for w in self.pool.workers])
        self.client.observe.remote(timing.phase, self.mode, timing.seconds, snaps)

    @contextlib.contextmanager
    def _session(self, token_ids: list[int], sampling: SamplingConfig):
        sid = uuid.uuid4().hex[:12]
        n = ray.get(self.client.open_session.remote(sid, list(token_ids), sampling))
        try:
            self.pool.connect(sid, self.client)
            yield sid, n, Driver(RayRunner(self.pool, self.client, sid), self.cfg, self.plan, self.mode)
        finally:
            self.client.close.remote(sid)
            self.pool.close(sid)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 on_token=None, on_step=None, keep_logits: bool = False) -> SecureResult:
        with self._session(prompt_ids, sampling) as (sid, n_prompt, driver):
            seen: list[int] = []

            def step(timing: StepTiming):
                self._observe(timing)
                new = ray.get(self.client.new_tokens.remote(sid, len(seen)))  # the user's side reads tokens
                seen.extend(new)
                if on_token:
                    for tok in new:
                        on_token(tok)
                if on_step:
                    on_step(timing, len(seen))

            timings = driver.generate(n_prompt, max_new_tokens, on_step=step)
            logits = ray.get(self.client.logits.remote(sid)) if keep_logits else []
            return SecureResult(seen, timings, logits, self.pool.node_ids(), self.pool.provider_name)

    def score(self, token_ids: list[int], on_step=None) -> np.ndarray:
        """Secure logits (client side) at every position of a given text: (T, vocab)."""
        with self._session(token_ids, SamplingConfig()) as (sid, n, driver):
            driver.score(n, on_step=on_step)
            return np.stack(ray.get(self.client.logits.remote(sid)))
