"""Worker actor: a ``ServerShard`` behind Ray, long-lived, serving many sessions.

It loads the checkpoint on its own node and encodes its weight shards once, with the server's
own key-less encoding context. Each session brings the client's *public* HE context (``ray.put``
once by the gateway); its ciphertexts and shares travel over the session's TLS data links to
the client (``links.py``), never through Ray. The actor never holds a secret key.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import ray

from cryptogen import memory, secure_plan as sp
from cryptogen.he.engine import add_exports, exports_of, restore_exports
from cryptogen.model import GPT
from cryptogen.mpc.party import Party
from cryptogen.telemetry import Telemetry

from .links import LinkServer
from .shard import ServerShard, SessionError

# HE-operation metric label of each stage's kernels (attention includes its q/k/v and W_o products).
_KERNEL = {"embed": "embed", "layernorm": "linear", "attention": "attention", "mlp": "linear", "head": "lm_head",
           "pick": "lm_head"}
LINK_TIMEOUT = 60.0


def link_bind_host(gateway_host: str, gateway_node: str | None) -> tuple[str, str]:
    """(bind, advertise) address of this worker's data links: the gateway's listen host when the
    worker shares its node (loopback stays loopback), else this node's address."""
    node_ip = ray.util.get_node_ip_address()
    same_node = gateway_node is None or gateway_node == ray.get_runtime_context().get_node_id()
    if same_node and gateway_host not in ("", "0.0.0.0", "::"):
        return gateway_host, gateway_host
    if gateway_host in ("", "0.0.0.0", "::"):
        return gateway_host or "0.0.0.0", node_ip
    return node_ip, node_ip


@ray.remote(max_concurrency=64)
class WorkerActor:
    def __init__(self, index: int, model, plan, he_config, tls: tuple[str, str], gateway_host: str,
                 gateway_node: str | None, link_cap: int, link_timeout: float = LINK_TIMEOUT):
        """``model``: a GPT, or the path of a checkpoint folder on this node (the server's model store).
        ``tls``: the server's certificate and key (PEM), presented on the data links."""
        memory.keep_freed_memory()  # the server's mode, passed in the actor's environment (ray_runner)
        if isinstance(model, str):
            model = GPT.from_pretrained(model)
        self.index, self.fp, self.he_config, self.link_timeout = index, he_config.fixed_point, he_config, link_timeout
        lead = {l for l in range(model.config.n_layer) if plan.lead(l) == index}
        self.shard = ServerShard(model, plan.workers[index], None, holds_ends=index == 0,
                                 lead_layers=lead, he_config=he_config,
                                 embed_shards=sp.embed_owners(model.config, plan)[index],
                                 head_cols=sp.head_columns(model.config, plan).get(index),
                                 key_share=len(plan.workers))
        self.telemetry = Telemetry(f"worker-{index}")
        bind, self.advertise = link_bind_host(gateway_host, gateway_node)
        self.links = LinkServer(bind, tls[0], tls[1], link_cap)
        self.parties: dict[str, Party] = {}
        self.link_chans: dict[str, list] = {}  # every data link a session opened (online, offline)
        self.tokens: dict[str, dict] = {}
        self._double: dict[str, int] = {}  # restored sessions: exports since restore count twice (see restore)
        self._lock = threading.Lock()
        self.incarnation = os.urandom(8).hex()  # new after every restart (the gateway notices a restart by it)

    def identity(self) -> tuple[str, int]:
        """(incarnation, pid): the pid only for fault-injection tests and the soak script."""
        return self.incarnation, os.getpid()

    def address(self) -> tuple[str, int]:
        return self.advertise, self.links.port

    def open_session(self, sid: str, public_context: bytes, tokens: dict) -> bool:
        """Check the client's public context against the server's parameters and expect its links."""
        self.shard.open_session(sid, public_context)
        with self._lock:
            self.tokens[sid] = dict(tokens)
        self.links.expect(tokens.values())
        return True

    def connect(self, sid: str, provider) -> bool:
        """Wait for the client's data links, shake hands. ``provider``: "he" (dealer-free, over the
        offline link) or a picklable dealer provider. Every link that arrives is recorded at once,
        so a session closed while connecting (or a failure here) aborts whatever it opened."""
        tokens = self.tokens[sid]
        try:
            online = self._claim(sid, tokens["online"])
            offline = self._claim(sid, tokens["offline"]) if "offline" in tokens else None
            if provider == "he":
                from cryptogen.mpc.provider_he import HEProvider
                if offline is None:
                    raise SessionError("the dealer-free provider needs the session's offline link")
                provider = HEProvider(self.he_config, offline=offline)  # it follows the client's batches
            party = Party("server", online, provider, self.fp)
            with self._lock:
                if sid not in self.tokens:
                    raise SessionError("the session was closed")
                self.parties[sid] = party
            party.handshake()
        except BaseException:
            self._abort_links(sid)
            raise
        return True

    def _claim(self, sid: str, token: str):
        chan = self.links.wait(token, self.link_timeout)
        with self._lock:
            if sid not in self.tokens:  # closed while waiting
                chan.abort()
                raise SessionError("the session was closed")
            self.link_chans.setdefault(sid, []).append(chan)
        return chan

    def _abort_links(self, sid: str) -> None:
        with self._lock:
            chans = self.link_chans.pop(sid, [])
        for chan in chans:
            chan.abort()

    def stage(self, sid: str, name: str, *args, after=None) -> dict:
        """Run the server half of stage ``name``; ``after`` only orders calls (a previous ref)."""
        party = self.parties.get(sid)
        if party is None:
            raise SessionError("unknown or closed session")
        before = self.shard.stats.snapshot()
        try:
            with self.telemetry.stage(name):
                out = getattr(self.shard, name)(party, sid, *args)
        except BaseException:
            self._abort_links(sid)  # the client's half blocked on this worker fails at once
            raise
        d = self.shard.stats.diff(before)
        self.telemetry.he_ops(_KERNEL[name], ct_pt=d.ct_pt_mul, ct_ct=d.ct_ct_mul, rotations=d.rotations)
        if d.refreshes:
            self.telemetry.refreshes(d.refreshes)
        return out

    def step_done(self, sid: str, decoded_at: int | None, after=None) -> bool:
        """The step has ended on this worker: a remote dealer's source asks for the next step's items
        (the client's does alike, at the same point of its takes; ``RemoteDealerSource.step_done``)."""
        party = self.parties.get(sid)
        if party is None:
            raise SessionError("unknown or closed session")
        done = getattr(party.cr, "step_done", None)
        if done is not None:
            done(decoded_at)
        return True

    def telemetry_snapshot(self):
        kv = self.shard.cache_stats()
        self.telemetry.kv_cache(self.index, kv["ciphertexts"], kv["bytes"])
        return self.telemetry.snapshot()

    def checkpoint(self, sid: str, serial: int, base: int | None, after=None) -> tuple[dict, dict]:
        """After a completed step: (public facts, the session's encrypted KV cache as bytes), numbered
        ``serial``: whole, or only what changed since checkpoint ``base`` when this session's cache was
        last saved or restored as that one (``WorkerShard.checkpoint``; meta "whole" says which).
        Called with ``num_returns=2`` by the gateway, which owns both objects: they outlive this
        process, so a restarted worker restores from them (``restore``). Only ciphertexts under the
        client's key and public counts; they stay inside the server's cluster. Each blob goes out as
        a uint8 array (a view of its bytes): Ray writes an array into its object store in one copy,
        where a bytes object passes through its msgpack serialiser first (docs/BENCHMARKS.md)."""
        blobs, whole, exports = self.shard.checkpoint(sid, serial, base)
        blobs = {k: np.frombuffer(b, np.uint8) for k, b in blobs.items()}
        with self._lock:
            since = self._double.pop(sid, None)
        if since is not None:  # the lost attempt of the redone step exported no more than the redo
            add_exports(self.shard.key_id(sid), exports - since)
            exports += exports - since
        meta = {"exports": exports, "whole": whole, "written": sum(len(b) for b in blobs.values()),
                "bytes": self.shard.cache_stats(sid)["bytes"], "caches": len(blobs)}
        return meta, blobs

    def restore(self, sid: str, serial: int | None, *chain) -> bool:
        """Put a checkpoint's cache into a (re)opened session: ``chain`` is (meta, blobs) of its whole
        checkpoint and of each delta after it, oldest first (none: the empty cache of a session that
        failed in its first step). A restarted process lost its count of the key's exports: it
        resumes from the checkpoint's count, and the exports of the step being redone are counted
        twice at the next checkpoint (the lost attempt made at most as many)."""
        metas, blobs = chain[0::2], chain[1::2]
        self.shard.restore(sid, [{k: bytes(memoryview(b)) for k, b in one.items()} for one in blobs], serial)
        kid = self.shard.key_id(sid)
        floor = int(metas[-1]["exports"]) if metas else 0
        if exports_of(kid) < floor or (not metas and exports_of(kid) == 0):
            restore_exports(kid, floor)
            with self._lock:
                self._double[sid] = floor
        return True

    def reset_cache(self, sid: str, after=None) -> bool:
        self.shard.reset_cache(sid)
        return True

    def close(self, sid: str) -> None:
        """Free everything the session holds: links (aborted: a stage blocked on them fails at once),
        randomness pools, cache."""
        with self._lock:
            tokens = self.tokens.pop(sid, {})
            party = self.parties.pop(sid, None)
            self._double.pop(sid, None)
        self.links.forget(tokens.values())
        if party is not None:
            closer = getattr(party.cr, "close", None)
            if closer is not None:
                closer()
        self._abort_links(sid)
        self.shard.close_session(sid)

    def exports(self, key_id: bytes) -> int:
        """Ciphertexts this process counts as exported under a key (public; for the restart test)."""
        return exports_of(key_id)

    def open_sessions(self) -> int:
        return len(self.shard.sessions)

    def stats(self) -> dict:
        return {"worker": self.index, "he": self.shard.stats.as_dict(), "kv": self.shard.cache_stats()}

    def is_public_only(self) -> bool:
        """For the privacy test: raises (SecretKeyError) if any HE context here is not public."""
        self.shard.ctx.assert_public()
        for s in self.shard.sessions.values():
            s["engine"].ctx.assert_public()
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
