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
from cryptogen.telemetry import Telemetry

from .session import ClientSession


@ray.remote(max_concurrency=64)
class ClientActor:
    def __init__(self, cfg, plan, he_config):
        self.cfg, self.plan, self.he_config = cfg, plan, he_config
        self.keys = ClientKeys.generate(he_config, sp.rotation_steps(cfg, plan, he_config.n))
        self.sessions: dict[str, ClientSession] = {}
        self.parties: dict[str, dict[int, Party]] = {}
        self._lock = threading.Lock()
        self.telemetry = Telemetry("client")
        self.exporter = None
        self._seen: dict = {}  # (sid, worker) -> last channel/randomness totals recorded

    def start_metrics(self, port: int) -> int:
        """Serve Prometheus metrics on 127.0.0.1:port (0: any free port); returns the port."""
        from .metrics import MetricsExporter

        self.exporter = MetricsExporter(self.telemetry, port=port).start()
        return self.exporter.port

    def observe(self, phase: str, mode: str, seconds: float, worker_snapshots: list) -> None:
        """Public per-token facts from the scheduler (latency) and the workers (op counts, cache)."""
        self.telemetry.token(phase, mode, seconds)
        for snap in worker_snapshots:
            self.telemetry.merge(snap)

    def public_context(self) -> bytes:
        """Public key, relinearisation key and the Galois keys the kernels use; no secret key."""
        return self.keys.public_context_bytes()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def open_session(self, sid: str, prompt_ids: list[int], sampling: SamplingConfig) -> int:
        """Returns only the prompt length (public)."""
        self.sessions[sid] = ClientSession(self.cfg, self.plan, self.keys, prompt_ids, Sampler(sampling))
        self.parties[sid] = {}
        self.telemetry.sessions(len(self.sessions))
        return len(prompt_ids)

    def dial(self, sid: str, index: int, host: str, port: int, provider) -> bool:
        party = Party("client", dial(host, port), provider, self.he_config.fixed_point)
        party.handshake()
        with self._lock:
            self.parties[sid][index] = party
        return True

    def stage(self, sid: str, name: str, workers: list[int], args: tuple, after=None) -> bool:
        parties = {w: self.parties[sid][w] for w in workers}
        with self.telemetry.stage(name):
            getattr(self.sessions[sid], name)(parties, *args)
        for w, party in parties.items():
            self._record_traffic(sid, w, party)
        return True

    def _record_traffic(self, sid: str, w: int, party) -> None:
        phases = party.chan.stats.phases.values()
        now = {"sent": sum(ph.bytes_sent for ph in phases), "recv": sum(ph.bytes_recv for ph in phases),
               "rounds": sum(ph.rounds for ph in phases)}
        cr = party.cr.counters()
        for kind in ("triple", "bits", "matrix"):
            now[f"p_{kind}"] = cr["produced"].get(kind, 0)
            now[f"c_{kind}"] = cr["consumed"].get(kind, 0)
        last = self._seen.get((sid, w), dict.fromkeys(now, 0))
        d = {k: now[k] - last[k] for k in now}
        self._seen[(sid, w)] = now
        self.telemetry.traffic(bytes_to_server=d["sent"], bytes_to_client=d["recv"], rounds=d["rounds"])
        for kind in ("triple", "bits", "matrix"):
            self.telemetry.triples(kind, produced=d[f"p_{kind}"], consumed=d[f"c_{kind}"])

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
        self._seen = {k: v for k, v in self._seen.items() if k[0] != sid}
        self.telemetry.sessions(len(self.sessions))

    def abort(self, sid: str) -> None:
        """Unblock any stage of this session waiting on a dead worker."""
        for party in self.parties.get(sid, {}).values():
            party.chan.abort()
