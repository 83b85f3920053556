"""Ray backend for the driver: worker actors in a placement group, stages fanned out.

``stage`` submits the client's call and every serving worker's call at once and returns
the workers' result refs (never fetched by the driver: later stages take them as
arguments, so server shares flow worker -> worker through the object store). Calls to
one actor are chained with an ``after`` ref so they run in submission order. ``barrier``
waits once per token and fails fast, naming the worker, if an actor died.
"""
from __future__ import annotations

import os

import uuid

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cryptogen.cluster.connect import worker_placement
from cryptogen.cluster.dealer import DealerActor, RayDealerProvider
from cryptogen.mpc.provider_he import HEProvider

from ..workers.actor import WorkerActor

PROVIDERS = ("dealer", "he")


class WorkerDied(RuntimeError):
    """A worker actor died during generation."""


class ServerPool:
    """The server side: worker actors (one per plan worker) holding shards and caches."""

    def __init__(self, model, plan, public_context: bytes, he_config, provider: str = "dealer"):
        """``he_config``: the server's HE parameters; the client's public context must match them."""
        if provider not in PROVIDERS:
            raise ValueError(f"unknown correlated-randomness provider {provider!r}; choose {' or '.join(PROVIDERS)}")
        fp = he_config.fixed_point
        self.plan, self.fp, self.he_config, self.provider_name = plan, fp, he_config, provider
        self.pg = worker_placement(len(plan.workers))
        # a checkpoint folder (str) is read by each worker on its own node: the weights never pass
        # through the driver; a GPT object (tests, bench) is put once and shared
        model_ref = str(model) if isinstance(model, (str, os.PathLike)) else ray.put(model)
        ctx_ref = ray.put(public_context)  # once, shared by all workers
        self.workers = [
            WorkerActor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i), num_cpus=1)
            .remote(i, model_ref, plan, ctx_ref, he_config)
            for i in range(len(plan.workers))]
        ray.get([w.ready.remote() for w in self.workers])
        self.dealer = DealerActor.remote(fp.t) if provider == "dealer" else None

    def provider_for(self, link: str):
        if self.provider_name == "dealer":
            return RayDealerProvider(self.dealer, link, self.fp.t)
        return HEProvider(self.he_config)

    def connect(self, sid: str, client) -> None:
        """Handshake every client<->worker link of a new session (fan out, one get)."""
        client_ip = ray.get(client.node_ip.remote())
        addrs = ray.get([w.listen.remote(sid, client_ip) for w in self.workers])
        refs = []
        for i, (w, (host, port)) in enumerate(zip(self.workers, addrs)):
            provider = self.provider_for(f"{sid}/{i}")
            refs += [w.accept.remote(sid, provider), client.dial.remote(sid, i, host, port, provider)]
        ray.get(refs)

    def node_ids(self) -> list[str]:
        return ray.get([w.node_id.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Kill the workers and the dealer and free the placement group."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.workers + ([self.dealer] if self.dealer is not None else []):
            ray.kill(actor)
        remove_placement_group(self.pg)

    def close(self, sid: str) -> None:
        for w in self.workers:
            w.close.remote(sid)
        if self.dealer is not None:
            self.dealer.forget.remote(f"{sid}/")


class RayRunner:
    def __init__(self, pool: ServerPool, client, sid: str | None = None):
        self.pool, self.client = pool, client
        self.sid = sid or uuid.uuid4().hex[:12]
        self._last_client = None
        self._last_worker: dict[int, object] = {}

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        self._last_client = self.client.stage.remote(self.sid, name, workers, client, after=self._last_client)
        refs = {}
        for w in workers:
            refs[w] = self.pool.workers[w].stage.remote(self.sid, name, *server, after=self._last_worker.get(w))
            self._last_worker[w] = refs[w]
        return refs

    def reset_cache(self) -> None:
        for w, actor in enumerate(self.pool.workers):
            self._last_worker[w] = actor.reset_cache.remote(self.sid, after=self._last_worker.get(w))

    def barrier(self) -> None:
        pending = [self._last_client, *self._last_worker.values()]
        pending = [r for r in pending if r is not None]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                self.client.abort.remote(self.sid)
                raise WorkerDied(self._who(done[0], e)) from None
            except ray.exceptions.RayTaskError:
                self.client.abort.remote(self.sid)
                raise

    def _who(self, ref, err) -> str:
        for w, r in self._last_worker.items():
            if r == ref:
                return f"worker {w} died during generation (session {self.sid}); other sessions are unaffected"
        return f"an actor died during generation (session {self.sid}): {type(err).__name__}"
