"""One client's session on the server, across worker restarts and client reconnects.

A session outlives its *epochs*. An epoch is one set of data links, randomness pools and
per-worker session state, named ``<sid>.<epoch>`` on the workers. What carries over from one
epoch to the next is public or encrypted under the client's key and never leaves the server's
cluster: the client's public context, the number of committed cache positions, and the
per-step checkpoints of every worker's encrypted KV cache (``WorkerActor.checkpoint``, objects
owned by the gateway's process, so they outlive a worker's process).

Recovery (docs/RELIABILITY.md):
  1. a step fails: every worker frees the epoch (links aborted, so the client's blocked halves
     fail at once), the gateway waits until every call of the step has ended;
  2. if a worker's process was replaced (Ray restarted the actor, ``ServerPool.restarted``),
     a new epoch opens on every worker, each restores the last committed checkpoint (the
     restarted one also its count of the key's exports, see ``WorkerActor.restore``);
  3. the client gets ``retry`` {cached, links}: it rolls its own state back to ``cached``,
     dials the new links and sends the same step again. Otherwise the error goes to the client.
A client whose connection drops is *parked* for ``resume_grace`` seconds: its epoch is freed,
its checkpoints kept; ``resume`` {sid, secret, cached} on a new authenticated connection
continues it from the checkpoint the client names (the latest, or the one before it when the
client never saw the last ``done``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import ray

from cryptogen.net.tls import new_secret


@dataclass
class Checkpoint:
    """Every worker's cache after a step, as a chain: per worker [(meta ref, cache ref)] of its last
    whole checkpoint and of each delta since (``WorkerActor.checkpoint``), oldest first. A decode
    step's delta is ~2 ciphertexts per cache where the whole cache grows with the context; a chain
    starts again whole once its deltas weigh as much as its whole part (so the objects kept stay
    within twice the cache, as two whole checkpoints were)."""
    cached: int  # positions in the cache
    refs: list | None  # per worker, its chain; None: the empty cache
    kv_bytes: int = 0  # the whole session's cache, all workers (public)
    serial: int = 0  # this session's count of checkpoints: a worker's delta names the one it follows
    sizes: list | None = None  # per worker, the bytes of each link of its chain

    @property
    def takes_delta(self) -> bool:
        """Can the next checkpoint be a delta after this one?"""
        if self.refs is None:
            return False
        return sum(sum(s[1:]) for s in self.sizes) < sum(s[0] for s in self.sizes)


@dataclass
class ServerSession:
    sid: str
    secret: str
    public_context: bytes
    mode: str
    provider: str
    epoch: int = 0
    cached: int = 0
    checkpoints: list = field(default_factory=lambda: [Checkpoint(0, None)])  # oldest first, at most 2
    retries: int = 0  # recoveries of the step in flight (reset when a step completes)
    recoveries: int = 0
    tokens: list = field(default_factory=list)  # this epoch's per-worker link tokens
    incarnations: list = field(default_factory=list)  # the workers' processes this epoch opened on
    expiry: threading.Timer | None = None

    @classmethod
    def new(cls, public_context: bytes, mode: str, provider: str) -> "ServerSession":
        return cls(new_secret()[:32], new_secret(), public_context, mode, provider)

    @property
    def wsid(self) -> str:
        """The workers' name of this epoch."""
        return f"{self.sid}.{self.epoch}"

    # ---- epochs --------------------------------------------------------------------------------
    def open_epoch(self, pool, restore: Checkpoint | None = None) -> list[dict]:
        """A fresh epoch on every worker (new link tokens), its cache restored; returns the links."""
        self.epoch += 1
        self.incarnations = [inc for inc, _ in pool.refresh()]
        n = len(pool.workers)
        self.tokens = [{"online": new_secret(), **({"offline": new_secret()} if self.provider == "he" else {})}
                       for _ in range(n)]
        pool.open_session(self.wsid, self.public_context, self.tokens)
        if restore is not None:
            pool.restore(self.wsid, restore.serial, restore.refs)
            self.cached = restore.cached
        return [dict(worker=i, host=h, port=p, tokens=self.tokens[i]) for i, (h, p) in enumerate(pool.addresses)]

    def restarted(self, pool) -> list[int]:
        """Workers whose process was replaced since this epoch opened (each session keeps its own view)."""
        return [i for i, (inc, _) in enumerate(pool.refresh()) if inc != self.incarnations[i]]

    def close_epoch(self, pool, runner=None) -> None:
        """Free this epoch on every worker (its links abort at once), then wait for its calls to end."""
        pool.close(self.wsid)
        if runner is not None:
            runner.settle()

    # ---- checkpoints ---------------------------------------------------------------------------
    def base(self) -> tuple[int, int | None]:
        """(the next checkpoint's serial, the checkpoint it may be a delta after, or None: whole)."""
        last = self.checkpoints[-1]
        return last.serial + 1, (last.serial if last.takes_delta else None)

    def commit(self, cached: int, refs: list | None) -> Checkpoint:
        """A completed step: wait for the workers' checkpoints (their small metas only) and chain
        each worker's delta after the last checkpoint's chain."""
        last = self.checkpoints[-1]
        ckpt = Checkpoint(cached, None, serial=last.serial + 1)
        if refs is not None:
            metas = ray.get([meta for meta, _ in refs])
            ckpt.kv_bytes = sum(int(m["bytes"]) for m in metas)
            ckpt.refs, ckpt.sizes = [], []
            for w, (m, pair) in enumerate(zip(metas, refs)):  # a worker that wrote a whole one starts again
                keep = not m["whole"] and last.refs is not None
                ckpt.refs.append((last.refs[w] if keep else []) + [pair])
                ckpt.sizes.append((last.sizes[w] if keep else []) + [int(m["written"])])
        self.checkpoints = [last, ckpt]
        self.cached, self.retries = cached, 0
        return ckpt

    def acknowledge(self) -> None:
        """The client sent its next step: it has the latest one; older checkpoints can go."""
        self.checkpoints = self.checkpoints[-1:]

    def checkpoint_at(self, cached: int) -> Checkpoint | None:
        for c in self.checkpoints:
            if c.cached == cached:
                return c
        return None

    def latest(self) -> Checkpoint:
        return self.checkpoints[-1]

    def drop(self) -> None:
        """Forget every checkpoint (their objects are freed with the last reference)."""
        self.checkpoints = []
        if self.expiry is not None:
            self.expiry.cancel()
