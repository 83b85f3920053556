"""Ray backend for the server's driver: worker actors in a placement group, stages fanned out.

Server side only (it runs in the gateway's process on the model owner's cluster). ``stage``
submits every serving worker's call at once and returns the result refs: later stages take them
as arguments, so server shares flow worker -> worker through the object store and only this
process (the server's own) could ever read them. Calls to one actor are chained with an
``after`` ref so they run in submission order. ``barrier`` waits once per step and fails fast,
naming the worker, if an actor died.
"""
from __future__ import annotations

import os
import time

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cryptogen import memory
from cryptogen.cluster.connect import worker_placement

from ..workers.actor import WorkerActor

MAX_RESTARTS = -1  # a long-lived server: Ray restarts a worker whose process died, every time
# glibc makes a malloc arena per thread that allocates; a worker's Ray method threads then hold
# 800-920 MB where 2 arenas hold 555-620 MB (scripts/soak.py, docs/RELIABILITY.md). The server's
# environment may set another value. With memory kept (the default) the worker sets one arena itself
# (cryptogen/memory.py); this applies with CRYPTOGEN_MEMORY=system.
WORKER_ENV = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
RESTART_WAIT_S = 120.0  # how long a repeatable call waits for a restarting worker to come back


def through_restarts(call, wait: float = RESTART_WAIT_S, pause: float = 0.5, clock=time.monotonic,
                     sleep=time.sleep):
    """``call()`` (a ``ray.get`` of calls that are safe to repeat), repeated while a worker is
    restarting. A call sent in the moment a worker's process dies, before Ray has marked it dead,
    fails with ``RayActorError`` even though Ray is about to restart it (seen under load: a second
    session recovering from the same kill); after ``wait`` seconds the error stands."""
    deadline = clock() + wait
    while True:
        try:
            return call()
        except ray.exceptions.RayActorError:
            if clock() >= deadline:
                raise
            sleep(pause)


class WorkerDied(RuntimeError):
    """A worker actor died during generation."""


class ClientGone(RuntimeError):
    """The session's client disconnected while the server was working on a step."""


class ServerPool:
    """The server's worker actors (one per plan worker): weights loaded and encoded once, serving
    every session; each listens for data links on one TLS port."""

    def __init__(self, model, plan, he_config, tls: tuple[str, str], gateway_host: str, link_cap: int,
                 max_restarts: int = MAX_RESTARTS):
        """``max_restarts``: how often Ray restarts each worker actor after its process died (it
        reloads and re-encodes its weights; the gateway restores its sessions' caches)."""
        self.plan, self.he_config = plan, he_config
        self.pg = worker_placement(len(plan.workers))
        # a checkpoint folder (str) is read by each worker on its own node: the weights never pass
        # through this process; a GPT object (tests, bench) is put once and shared
        model_ref = str(model) if isinstance(model, (str, os.PathLike)) else ray.put(model)
        here = ray.get_runtime_context().get_node_id()
        self.workers = [
            WorkerActor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i), num_cpus=1,
                max_restarts=max_restarts, max_task_retries=0,
                runtime_env={"env_vars": {**WORKER_ENV, memory.ENV: memory.mode()}})
            .remote(i, model_ref, plan, he_config, tls, gateway_host, here, link_cap)
            for i in range(len(plan.workers))]
        self.addresses = ray.get([w.address.remote() for w in self.workers])
        self.identities = ray.get([w.identity.remote() for w in self.workers])  # (incarnation, pid)

    def refresh(self) -> list[tuple[str, int]]:
        """Every worker's (incarnation, pid) now (waits for a restarting actor to come back;
        ``RayActorError`` if it is out of restarts or not back in ``RESTART_WAIT_S``). A restarted
        worker listens on a new port: the link addresses are read again when an incarnation changed."""
        now = through_restarts(lambda: ray.get([w.identity.remote() for w in self.workers]))
        if now != self.identities:
            self.addresses = through_restarts(lambda: ray.get([w.address.remote() for w in self.workers]))
            self.identities = now
        return now

    def checkpoint(self, sid: str, after: dict, serial: int, base: int | None) -> list:
        """Per worker (meta ref, cache ref), owned by this process: they survive the worker's process.
        Each is whole or only the changes since checkpoint ``base`` (``WorkerActor.checkpoint``)."""
        return [w.checkpoint.options(num_returns=2).remote(sid, serial, base, after=after.get(i))
                for i, w in enumerate(self.workers)]

    def restore(self, sid: str, serial: int, chains: list | None) -> None:
        """Every worker's cache from its chain [(meta ref, cache ref)], whole first (None: empty)."""
        ray.get([w.restore.remote(sid, serial, *[r for pair in (chains[i] if chains else []) for r in pair])
                 for i, w in enumerate(self.workers)])

    def open_session(self, sid: str, public_context: bytes, tokens: list[dict]) -> None:
        ctx_ref = ray.put(public_context)  # once, shared by all workers
        ray.get([w.open_session.remote(sid, ctx_ref, tokens[i]) for i, w in enumerate(self.workers)])

    def connect(self, sid: str, providers: list) -> list:
        """Refs of every worker's link set-up (they complete when the client has dialled)."""
        return [w.connect.remote(sid, providers[i]) for i, w in enumerate(self.workers)]

    def close(self, sid: str) -> None:
        """Free the session on every worker still alive (a dead one freed everything with itself)."""
        for ref in [w.close.remote(sid) for w in self.workers]:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass

    def node_ids(self) -> list[str]:
        return ray.get([w.node_id.remote() for w in self.workers])

    def snapshots(self) -> list:
        return ray.get([w.telemetry_snapshot.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Kill the workers and free the placement group."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.workers:
            ray.kill(actor)
        remove_placement_group(self.pg)


class RayRunner:
    def __init__(self, pool: ServerPool, sid: str):
        self.pool, self.sid = pool, sid
        self._last_worker: dict[int, object] = {}
        self._step_refs: list = []  # every call since the last completed barrier

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        refs = {}
        for w in workers:
            refs[w] = self.pool.workers[w].stage.remote(self.sid, name, *server, after=self._last_worker.get(w))
            self._last_worker[w] = refs[w]
        self._step_refs.extend(refs.values())
        return refs

    def reset_cache(self) -> None:
        for w, actor in enumerate(self.pool.workers):
            self._last_worker[w] = actor.reset_cache.remote(self.sid, after=self._last_worker.get(w))
            self._step_refs.append(self._last_worker[w])

    def step_done(self, decoded_at: int | None) -> None:
        """Every worker, after its part of the step: a remote dealer's next items (``WorkerActor.step_done``)."""
        for w, actor in enumerate(self.pool.workers):
            self._last_worker[w] = actor.step_done.remote(self.sid, decoded_at, after=self._last_worker.get(w))
            self._step_refs.append(self._last_worker[w])

    def settle(self, timeout: float = 120.0) -> None:
        """After a failure: wait until every call of this step has ended, and collect their errors
        (expected now: the gateway decides; Ray would log them as unhandled)."""
        refs, self._step_refs = self._step_refs, []
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - the step's failure is handled by the caller
                pass
        self._last_worker.clear()

    def checkpoint(self, serial: int, base: int | None) -> list:
        """Per worker (meta ref, cache ref) of the cache after the calls so far (ordered after them)."""
        return self.pool.checkpoint(self.sid, self._last_worker, serial, base)

    def barrier(self, alive=None) -> None:
        """Wait for the step; ``alive()`` False (the client went away) ends the wait at once."""
        pending = [r for r in self._last_worker.values() if r is not None]
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if not done:
                if alive is not None and not alive():
                    raise ClientGone("the client disconnected during a step")
                continue
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                raise WorkerDied(self._who(done[0], e)) from None
        self._step_refs = []

    def _who(self, ref, err) -> str:
        for w, r in self._last_worker.items():
            if r == ref:
                return f"server worker {w} died during this session"
        return f"a server actor died during this session ({type(err).__name__})"
