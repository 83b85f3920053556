"""Worker actor: a ``ServerShard`` behind Ray, plus its end of each session's channel.

Built from the public HE context only (``ray.put`` once by the driver and shared by all
workers); ciphertexts arrive as bytes over the session's TCP channel to the client
(``cluster/channel.py``).
"""
from __future__ import annotations

import ray

from cryptogen.cluster.channel import Listener, link_host
from cryptogen import secure_plan as sp
from cryptogen.model import GPT
from cryptogen.mpc.party import Party
from cryptogen.telemetry import Telemetry

from .shard import ServerShard


# HE-operation metric label of each stage's kernels (attention includes its q/k/v and W_o products).
_KERNEL = {"embed": "embed", "layernorm": "linear", "attention": "attention", "mlp": "linear", "head": "lm_head"}


@ray.remote(max_concurrency=16)
class WorkerActor:
    def __init__(self, index: int, model, plan, public_context: bytes, he_config):
        """``model``: a GPT, or the path of a checkpoint folder on this node (the server's model store)."""
        if isinstance(model, str):
            model = GPT.from_pretrained(model)
        self.index, self.fp = index, he_config.fixed_point
        lead = {l for l in range(model.config.n_layer) if plan.lead(l) == index}
        self.shard = ServerShard(model, plan.workers[index], public_context, holds_ends=index == 0,
                                 lead_layers=lead, he_config=he_config,
                                 embed_shards=sp.embed_owners(model.config, plan)[index],
                                 head_cols=sp.head_columns(model.config, plan).get(index))
        self.telemetry = Telemetry(f"worker-{index}")
        self.listeners: dict[str, Listener] = {}
        self.parties: dict[str, Party] = {}

    def ready(self) -> int:
        return self.index

    def listen(self, sid: str, client_ip: str) -> tuple[str, int]:
        """Open a listening socket for the session's link; returns (host, port) for the client."""
        self.listeners[sid] = Listener(link_host(ray.util.get_node_ip_address(), client_ip))
        return self.listeners[sid].host, self.listeners[sid].port

    def accept(self, sid: str, provider) -> bool:
        """Take the client's connection, shake hands, open the session."""
        party = Party("server", self.listeners.pop(sid).accept(), provider, self.fp)
        party.handshake()
        self.shard.open_session(sid)
        self.parties[sid] = party
        return True

    def stage(self, sid: str, name: str, *args, after=None) -> dict:
        """Run the server half of stage ``name``; ``after`` only orders calls (a previous ref)."""
        before = self.shard.stats.snapshot()
        with self.telemetry.stage(name):
            out = getattr(self.shard, name)(self.parties[sid], sid, *args)
        d = self.shard.stats.diff(before)
        self.telemetry.he_ops(_KERNEL[name], ct_pt=d.ct_pt_mul, ct_ct=d.ct_ct_mul, rotations=d.rotations)
        if d.refreshes:
            self.telemetry.refreshes(d.refreshes)
        return out

    def telemetry_snapshot(self):
        kv = self.shard.cache_stats()
        self.telemetry.kv_cache(self.index, kv["ciphertexts"], kv["bytes"])
        return self.telemetry.snapshot()

    def reset_cache(self, sid: str, after=None) -> bool:
        self.shard.reset_cache(sid)
        return True

    def close(self, sid: str) -> None:
        self.shard.close_session(sid)
        party = self.parties.pop(sid, None)
        if party is not None:
            party.chan.close()

    def stats(self) -> dict:
        return {"worker": self.index, "he": self.shard.stats.as_dict(), "kv": self.shard.cache_stats()}

    def is_public_only(self) -> bool:
        """For the privacy test: raises (SecretKeyError) if this worker's HE context is not public."""
        self.shard.ctx.assert_public()
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()
