"""Client actor: the client's trust domain inside the Ray cluster.

It generates and keeps the secret key (only the public context leaves it), holds the
prompt's token ids, every client share, the logits and the sampled tokens, and runs the
client half of every stage. The scheduler only tells it which stage to run next and gets
back nothing but a done marker; the user's side (the CLI) reads tokens with ``new_tokens``.
"""
from __future__ import annotations

import threading

import ray

from cryptogen import secure_plan as sp
from cryptogen.cluster.channel import dial
from cryptogen.he.keys import ClientKeys
from cryptogen.mpc.party import Party
from cryptogen.sampling import Sampler, SamplingConfig

from .session import ClientSession


@ray.remote(max_concurrency=64)
class ClientActor:
    def __init__(self, cfg, plan, he_config):
        self.cfg, self.plan, self.he_config = cfg, plan, he_config
        self.keys = ClientKeys.generate(he_config, sp.rotation_steps(cfg, plan, he_config.n))
        self.sessions: dict[str, ClientSession] = {}
        self.parties: dict[str, dict[int, Party]] = {}
        self._lock = threading.Lock()

    def public_context(self) -> bytes:
        """Public key, relinearisation key and the Galois keys the kernels use; no secret key."""
        return self.keys.public_context_bytes()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def open_session(self, sid: str, prompt_ids: list[int], sampling: SamplingConfig) -> int:
        """Returns only the prompt length (public)."""
        self.sessions[sid] = ClientSession(self.cfg, self.plan, self.keys, prompt_ids, Sampler(sampling))
        self.parties[sid] = {}
        return len(prompt_ids)

    def dial(self, sid: str, index: int, host: str, port: int, provider) -> bool:
        party = Party("client", dial(host, port), provider, self.he_config.fixed_point)
        party.handshake()
        with self._lock:
            self.parties[sid][index] = party
        return True

    def stage(self, sid: str, name: str, workers: list[int], args: tuple, after=None) -> bool:
        parties = {w: self.parties[sid][w] for w in workers}
        getattr(self.sessions[sid], name)(parties, *args)
        return True

    # ---- the user's side (never called by the scheduler) ----------------------------------
    def new_tokens(self, sid: str, since: int) -> list[int]:
        return self.sessions[sid].generated[since:]

    def logits(self, sid: str) -> list:
        return self.sessions[sid].logit_history

    def close(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.close()
        for party in self.parties.pop(sid, {}).values():
            party.chan.close()

    def abort(self, sid: str) -> None:
        """Unblock any stage of this session waiting on a dead worker."""
        for party in self.parties.get(sid, {}).values():
            party.chan.abort()
