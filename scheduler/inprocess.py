"""In-process runner: the client and every worker as threads of one process, linked by
in-memory channels (like SPU's ``simulate`` / CrypTen's in-process communicator).

Same ``ClientSession`` / ``ServerShard`` code as the Ray deployment; used by the two-party
tests and for debugging. Each stage runs the client half and the serving workers' halves
concurrently and joins them; the server halves' results are passed on as plain values.
"""
from __future__ import annotations

import threading

import numpy as np

from cryptogen import secure_plan as sp
from cryptogen.he.keys import ClientKeys
from cryptogen.he.params import HEConfig
from cryptogen.mpc.channel import abort_on_error, channel_pair
from cryptogen.mpc.party import Party
from cryptogen.mpc.provider import DealerProvider
from cryptogen.twoparty import kv_prefill_client, kv_prefill_server

from ..client.session import ClientSession
from ..workers.shard import ServerShard


def _run_threads(jobs: dict, links: dict | None = None) -> dict:
    """Run ``jobs`` (key -> fn) as threads; a job that raises aborts its ``links[key]`` channels so
    its peers fail at once instead of waiting out their timeout."""
    out, errs = {}, {}
    links = links or {}

    def run(key, fn):
        try:
            with abort_on_error(*links.get(key, ())):
                out[key] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errs[key] = e

    threads = [threading.Thread(target=run, args=(k, fn)) for k, fn in jobs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errs:
        raise next(iter(errs.values()))
    return out


def plaintext_kv(model, ids: list[int]) -> list:
    """Tests and accuracy scripts: float64 per-layer (K, V) of ``ids``, each (P, n_head, d_head), K
    times d_head^-1/4 as the secure path caches it (workers/weights.py): what ``fill_caches`` takes."""
    import copy

    import torch

    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        _, presents = ref.prefill(torch.tensor([list(ids)]))
    dh = model.config.d_head
    return [(k[0].transpose(0, 1).numpy() * dh ** -0.25, v[0].transpose(0, 1).numpy()) for k, v in presents]


class InProcessRunner:
    sid = "local"

    def __init__(self, model, plan, prompt_ids, sampler=None, he_config: HEConfig | None = None,
                 provider_factory=DealerProvider, keys: ClientKeys | None = None, record: bool = False):
        """``record`` (tests): every link's channels keep each party's transcript (all it receives,
        handshake included) and the values opened to it (``Channel.transcript`` / ``.opened``)."""
        cfg = model.config
        self.he_config = he_config or (keys.config if keys is not None else HEConfig())
        steps = sp.rotation_steps(cfg, plan, self.he_config.n)
        self.keys = keys or ClientKeys.generate(self.he_config, steps)
        public = self.keys.public_context_bytes()
        embeds, heads = sp.embed_owners(cfg, plan), sp.head_columns(cfg, plan)
        self.plan = plan
        self.shards = {w.worker: ServerShard(model, w, public, holds_ends=w.worker == 0, he_config=self.he_config,
                                             lead_layers={l for l in range(cfg.n_layer) if plan.lead(l) == w.worker},
                                             embed_shards=embeds[w.worker], head_cols=heads.get(w.worker),
                                             key_share=len(plan.workers))
                       for w in plan.workers}
        for shard in self.shards.values():
            shard.open_session(self.sid)
        self.client = ClientSession(cfg, plan, self.keys, prompt_ids, sampler)
        self.client_parties, self.server_parties = {}, {}
        for w in self.shards:
            cc, sc = channel_pair(timeout=300, record=record)
            provider = provider_factory()
            self.client_parties[w] = Party("client", cc, provider, self.he_config.fixed_point)
            self.server_parties[w] = Party("server", sc, provider, self.he_config.fixed_point)
            _run_threads({"c": self.client_parties[w].handshake, "s": self.server_parties[w].handshake})

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        parties = {w: self.client_parties[w] for w in workers}
        jobs = {"client": lambda: getattr(self.client, name)(parties, *client)}
        for w in workers:
            jobs[w] = (lambda w=w: getattr(self.shards[w], name)(self.server_parties[w], self.sid, *server))
        links = {"client": [p.chan for p in parties.values()], **{w: [self.server_parties[w].chan] for w in workers}}
        out = _run_threads(jobs, links)
        return {w: out[w] for w in workers}

    def barrier(self) -> None:
        """Stages run synchronously here: nothing is outstanding."""

    def step_done(self, decoded_at: int | None) -> None:
        """Both parties' sources are in this process: the bench's ``dealer_ahead`` works ahead."""

    def reset_cache(self) -> None:
        for shard in self.shards.values():
            shard.reset_cache(self.sid)

    def fill_caches(self, kv: list, seed: int = 0) -> None:
        """Tests and accuracy scripts: append positions 0..P-1 to every worker's encrypted KV caches
        from given per-layer (K, V) reals, each (P, n_head, d_head), K as the secure path caches it
        (its d_head^-1/4 folded in: ``plaintext_kv``). The values are rounded at 2^f, split into
        uniform shares and appended through the real KV-prefill protocol, so the caches are what a
        secure prefill leaves without its 2PC error; then decode steps can start at position P."""
        rng = np.random.default_rng(seed)
        fp = self.he_config.fixed_point
        for wp in self.plan.workers:
            shard = self.shards[wp.worker]
            for ls in wp.shards:
                for g, (a, b) in enumerate(sp.head_groups(len(ls.heads), shard.cfg.d_head)):
                    heads = list(ls.heads[a:b])
                    K, V = (fp.encode(m[:, heads]) for m in kv[ls.layer])
                    K_s, V_s = (rng.integers(0, fp.t, size=K.shape, dtype=np.int64) for _ in range(2))
                    K_c, V_c = np.mod(K - K_s, fp.t), np.mod(V - V_s, fp.t)
                    cache = shard._cache(self.sid, ls.layer, g, b - a)
                    cc, sc = channel_pair(timeout=600)
                    own = self.client.kv_shares(ls.layer, ls.heads[a], b - a)
                    _run_threads({"c": lambda: kv_prefill_client(cc, self.client.role, own, 0, K_c, V_c),
                                  "s": lambda: kv_prefill_server(sc, cache, 0, K_s, V_s)})
