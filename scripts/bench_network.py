"""Secure generation under a shaped network: every client<->server byte through a user-space
shaped link (cryptogen/net/shaper.py), loopback vs LAN (1 Gbit/s, 0.5 ms RTT) vs WAN
(100 Mbit/s, 40 ms RTT, the WAN setting of Cheetah / BumbleBee), side by side in one run.

Starts ``cryptogen serve`` embedded in this process (gateway + Ray workers; with ``dealer`` among
the providers, a dealer too) and the Ray-free client. The client's ``dial``
(``cryptogen.client.remote.dial``) is wrapped: each (host, port) it dials (the gateway, each
worker's data port) gets a ``ShapedRelay`` on 127.0.0.1 and the client dials that instead; TLS
passes through unchanged (the certificate is pinned by fingerprint; the client does no host-name
check). "loopback" goes through the same relays unshaped, so their own cost is in every profile.
Relays run in a helper process (the client's and the gateway's Python threads would hold the
GIL and delay them). Not shaped: the dealer's links (a third party) and the gateway's Ray calls.

Modes:
  full     one session per profile, every byte shaped: the offline phase (``he``: the whole
           request's correlated randomness over the offline link before the first step; the
           demand forecast is calibrated first by a short unmeasured request), the prefill of a
           ``--context``-token prompt, ``--tokens`` decode steps;
  session  one session per provider: offline phase and prefill unshaped, then ``--tokens``
           decode steps under each profile in turn (the relays are reshaped between steps; the
           shaped offline / prefill times are predicted by the model below). For long prompts,
           whose shaped prefill would take too long on a shared machine.
  filled   session mode without the prefill: the server's KV caches start with ``--context``
           positions, encryptions of zero under the client's public key made server-side
           (``zero_caches``), and every step is a decode step, the first at position
           ``--context``. A decode step's HE work, rounds and bytes depend on the cache's length,
           not on its values, so this measures GPT-2 base at 128 context without its prefill
           (token by token, ~7 h here until #11's batched prefill). The tokens are not
           meaningful; dealer provider only (the dealer-free forecast expects a prefill).
Per run: the peak resident memory of the server's worker processes and of this process (client,
gateway and dealer threads). Per step: the client's rounds and payload bytes (its channels' own counters, control connection
included), the client's seconds blocked on correlated randomness (``client_cr_wait_s``: dealer fetches
or short HE pools), the seconds before the step waiting for the dealer's items asked after the
last one (``offline_s``; a decode step after a decode step has them made between the steps,
``decode_s_items_ahead``), the bytes the relays forwarded (TLS records) and the relay process's CPU seconds.
Model check against the loopback run: predicted = loopback seconds + rounds * RTT + bytes * 8 /
rate (every round a full RTT, the two directions one after the other), and the overlapped form
rounds * RTT / 2 + max(bytes each way) * 8 / rate (both parties send, then both receive).

    nice -n 5 .venv/bin/python scripts/bench_network.py --mode full --providers he --context 8 --tokens 1 \
        --out docs/bench/network.json
    nice -n 5 .venv/bin/python scripts/bench_network.py --mode session --providers dealer --context 128 \
        --tokens 3 --out docs/bench/network.json
    nice -n 5 .venv/bin/python scripts/bench_network.py --mode filled --providers dealer --model /tmp/g2full \
        --context 127 --tokens 1 --frame-cap-mib 512 --out docs/bench/network_gpt2.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOREM = ("The history of the city begins in the early years of the century, when the first settlers built "
         "their houses along the river. Over the following decades the town grew into a centre of trade, "
         "and its harbour was one of the busiest on the coast. ")


def _relay_host(conn) -> None:
    """The helper process: makes and reshapes relays on request, reports bytes and its CPU time."""
    from cryptogen.net.shaper import ShapedRelay
    relays = []
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            if msg[0] == "stats":
                conn.send(dict(bytes=[dict(r.bytes) for r in relays], cpu=time.process_time()))
            elif msg[0] == "shape":
                for r in relays:
                    r.set_shape(*msg[1:])
                conn.send(len(relays))
            else:
                relay = ShapedRelay(*msg[1:])
                relay.start()
                relays.append(relay)
                conn.send(relay.port)
        except Exception as e:  # noqa: BLE001 - reported to the bench
            conn.send(f"error: {e}")
    for r in relays:
        r.close()


class Relays:
    """Relays in a helper process, one per key (a profile's or the session's) and target."""

    def __init__(self):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_relay_host, args=(child,), daemon=True, name="shaped-relays")
        self.proc.start()
        self.ports: dict = {}

    def _ask(self, *msg):
        self.conn.send(msg)
        got = self.conn.recv()
        if isinstance(got, str):
            raise RuntimeError(got)
        return got

    def port(self, key: str, host: str, port: int, shape) -> int:
        if (key, host, port) not in self.ports:
            self.ports[key, host, port] = self._ask("relay", host, port, *shape)
        return self.ports[key, host, port]

    def reshape(self, shape) -> None:
        self._ask("shape", *shape)

    def stats(self) -> dict:
        return self._ask("stats")

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


def _chan_totals(chans) -> dict:
    out = dict(sent=0, recv=0, rounds=0)
    for ch in chans:
        for ph in ch.stats.phases.values():
            out["sent"] += ph.bytes_sent
            out["recv"] += ph.bytes_recv
            out["rounds"] += ph.rounds
    return out


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in b}


def run_session(conn_file: str, dealer_file, ids, provider: str, key: str, plan, relays, filled: bool = False) -> dict:
    """One session of len(plan) steps: ``plan[i]`` = (profile, shape) of step i (0: the prefill,
    and the offline phase before it; then decode steps; ``filled``: decode steps only, the first at
    position len(ids), on the server's zero caches). Every link goes through a relay of ``key``
    (shape (0, inf) for loopback: the relay's own cost is in every profile)."""
    import cryptogen.client.remote as remote
    from cryptogen.client.runner import ClientRunner

    orig, orig_offline, orig_stage = remote.dial, remote._Session._offline, ClientRunner.stage
    by_stage: dict = {}  # this step's client rounds and bytes per stage name (all layers)

    def stage(runner, name, workers, *a, **k):
        chans = [runner.parties[w].chan for w in workers]
        before = _chan_totals(chans)
        try:
            return orig_stage(runner, name, workers, *a, **k)
        finally:
            d = _delta(before, _chan_totals(chans))
            acc = by_stage.setdefault(name, dict(calls=0, rounds=0, bytes=0))
            acc["calls"] += 1
            acc["rounds"] += d["rounds"]
            acc["bytes"] += d["sent"] + d["recv"]
    links = {"control": [], "online": [], "offline": []}
    per_worker: dict = {}

    def shaped_dial(host, port, *a, **k):
        what = str(k.get("what", ""))
        ch = orig("127.0.0.1", relays.port(key, host, int(port), shape_now[0]), *a, **k)
        if what.startswith("server worker"):  # per session and worker: the online link, then the offline one
            n = per_worker[what] = per_worker.get(what, 0) + 1
            links["offline" if n % 2 == 0 and provider == "he" else "online"].append(ch)
        else:
            links["control"].append(ch)
        return ch

    def snap() -> dict:
        s = {k: _chan_totals(v) for k, v in links.items()}
        st = relays.stats()
        s["wire_up"] = sum(b["up"] for b in st["bytes"])  # every relay (idle ones add nothing)
        s["wire"] = s["wire_up"] + sum(b["down"] for b in st["bytes"])
        s["relay_cpu"] = st["cpu"]
        return s
    profile_of, shape_of = [p for p, _ in plan], [sh for _, sh in plan]
    shape_now = [shape_of[0]]
    steps, marks, after_offline = [], [], []

    sessions, waited = [], [0.0]

    def offline(session):  # the offline phase (he: the request's randomness), then a snapshot
        orig_offline(session)
        sessions[:] = [session]
        after_offline.append(snap())
        # the offline links' own counters, as the provider reports them (cryptogen/mpc/pool.py)
        cr = [p.cr.counters().get("offline", {}) for p in session.parties.values()]
        after_offline[-1]["provider"] = {k: sum(c.get(k, 0) for c in cr) for k in ("bytes_sent", "bytes_recv",
                                                                                   "rounds", "wall_s", "cpu_s")}

    def on_step(t):
        marks.append(snap())
        i = len(steps)
        T = len(ids) if i == 0 and not filled else 1
        # the client's online seconds blocked on correlated randomness (dealer fetches, short HE pools)
        w = sum(getattr(p.cr, "wait_s", 0.0) for s_ in sessions for p in s_.parties.values())
        steps.append(dict(profile=profile_of[i], phase=t.phase, position=t.position, T=T, seconds=round(t.seconds, 3),
                          offline_s=round(t.offline_s, 3), client_cr_wait_s=round(w - waited[0], 3),
                          stages=dict(by_stage)))
        waited[0] = w
        by_stage.clear()
        if i + 1 < len(shape_of) and shape_of[i + 1] != shape_now[0]:
            shape_now[0] = shape_of[i + 1]
            relays.reshape(shape_now[0])  # between steps: the links are idle
    remote.dial, remote._Session._offline, ClientRunner.stage = shaped_dial, offline, stage
    relays.reshape(shape_now[0])
    try:
        with remote.connect(conn_file, dealer=dealer_file, timeout=120) as c:
            start = snap()
            out = (_decode_after(c, ids, len(shape_of), on_step) if filled
                   else list(c.generate(ids, len(shape_of), provider=provider, on_step=on_step)))
            offline_s, forecast = c.last_offline_s, c.last_forecast
            demand = {k: v for k, v in c.demand["token"].obs.items() if k.startswith("0/")}  # worker 0's
    finally:
        remote.dial, remote._Session._offline, ClientRunner.stage = orig, orig_offline, orig_stage
    pre = _delta(start["offline"], after_offline[0]["offline"])  # the offline phase (before the first step)
    setup = {k: _delta(start[k], after_offline[0][k]) for k in ("control", "online")}  # keys, handshakes
    prev = after_offline[0]
    for st, s in zip(steps, marks):
        on, ctl = _delta(prev["online"], s["online"]), _delta(prev["control"], s["control"])
        off = _delta(prev["offline"], s["offline"])
        st.update(rounds=on["rounds"] + ctl["rounds"], bytes_to_server=on["sent"] + ctl["sent"],
                  bytes_to_client=on["recv"] + ctl["recv"], offline_link_bytes=off["sent"] + off["recv"],
                  wire_bytes=s["wire"] - prev["wire"], relay_cpu_s=round(s["relay_cpu"] - prev["relay_cpu"], 3))
        prev = s
    # randomness consumed per step (public counts: [1, T, T*(start+T), rows, items]), this session's
    used = {k: [r for r in rows if (r[1], r[2]) in {(st["T"], st["T"] * (st["position"] + 1)) for st in steps}]
            for k, rows in demand.items()}
    return dict(provider=provider, tokens=out, forecast_known=forecast, offline_s=round(offline_s, 3),
                offline_rounds=pre["rounds"], offline_bytes=pre["sent"] + pre["recv"],
                offline_bytes_to_server=pre["sent"], offline_bytes_to_client=pre["recv"],
                offline_wire_bytes=after_offline[0]["wire"] - start["wire"],
                offline_wire_up=after_offline[0]["wire_up"] - start["wire_up"],
                offline_provider_counters=after_offline[0]["provider"],
                link_totals={k: dict(_chan_totals(v), links=len(v)) for k, v in links.items()},
                setup_bytes_to_server=sum(v["sent"] for v in setup.values()),
                setup_bytes_to_client=sum(v["recv"] for v in setup.values()), steps=steps, consumed=used)


def peak_rss_parties(dealer_pid: int | None = None) -> dict:
    """Peak resident MiB per party, at the end of the run (``bench_ray.peak_rss`` of this process):
    the server's shards (the Ray worker actors, summed), the rest of the embedded Ray, and this
    process: the client, the gateway and the dealer's threads (the client's keys and public
    context, its shares and pools; the gateway holds no weights, the dealer only batches in flight).
    With ``--dealer-process``, the dealer's process apart."""
    from cryptogen.bench_ray import _peak_mib, peak_rss
    p = peak_rss(os.getpid())
    if dealer_pid is None:
        return {"server_workers": p["workers"], "ray_other": p["ray"], "client_gateway_dealer_process": p["self"]}
    d = _peak_mib(dealer_pid)
    return {"server_workers": p["workers"], "ray_other": round(p["ray"] - d, 1), "client_gateway_process": p["self"],
            "dealer_process": round(d, 1)}


def _decode_after(c, ids, n: int, on_step) -> list[int]:
    """``n`` decode steps, the first at position len(ids), on caches the server filled (``zero_caches``)."""
    from cryptogen.net.control import Forward
    from cryptogen.sampling import SamplingConfig
    P = len(ids)
    ids = list(ids) + [ids[-1]]  # the token at position P (the first step's input)
    steps = [Forward(P + i, 1, "token") for i in range(n)]
    with c._session(ids, SamplingConfig(), "kv-reuse", "dealer", steps) as s:
        s.session.assume_zero_cache(P)  # the client's own shares of the zero caches (he/arcc.py)
        for f in steps:
            s.step(f, "decode", on_step)
        return s.session.tokens[P + 1:]


def zero_caches(gw, positions: int) -> None:
    """Server side, bench only: a session opens with every worker's KV caches holding
    ``positions`` positions, encryptions of zero under the client's public context (what the
    server has; no secret), restored like a checkpoint (``WorkerActor.restore``) before the
    client gets its links, so no step's time includes it."""
    import numpy as np

    from cryptogen import secure_plan as sp
    from cryptogen.he.engine import ServerEngine
    from cryptogen.he.keys import PublicContext
    from cryptogen.he.kvcache import EncryptedKVCache
    from cryptogen.server.session import ServerSession

    orig = ServerSession.open_epoch

    def caches(sess) -> list:
        engine = ServerEngine(PublicContext.from_bytes(sess.public_context, gw.he_config))
        zero = np.zeros(engine.config.n, np.int64)
        out = []
        for wp in gw.plan.workers:
            blobs = {}
            for sh in wp.shards:
                for g, (lo, hi) in enumerate(sp.head_groups(len(sh.heads), gw.cfg.d_head)):
                    cache = EncryptedKVCache(engine, gw.cfg.d_head, sh.layer, g, hi - lo)
                    n_ct = -(-positions // cache.layout.tpc)
                    cache.k = [engine.encrypt(zero) for _ in range(n_ct)]
                    cache.v = [engine.encrypt(zero) for _ in range(n_ct)]
                    cache.length = positions
                    zeros = np.zeros((positions, hi - lo, gw.cfg.d_head), np.int64)
                    cache.shares.write(0, zeros, zeros)  # the server's shares of the zeros
                    blobs[f"{sh.layer}/{g}"] = cache.to_bytes()
            out.append([({"exports": 0}, blobs)])
        return out

    def open_epoch(sess, pool, restore=None):
        links = orig(sess, pool, restore)
        if restore is None and sess.cached == 0:
            t0 = time.perf_counter()
            pool.restore(sess.wsid, None, caches(sess))  # no serial: the first checkpoint is whole
            sess.cached = positions
            print(f"[bench_network] caches of {positions} positions filled in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        return links
    ServerSession.open_epoch = open_epoch


def _nbytes(s) -> int:
    return s["bytes_to_server"] + s["bytes_to_client"]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _models(base_s: float, rounds: int, up: int, down: int, shape) -> dict:
    """Shaped seconds from the loopback seconds: ``serial`` (every round a full RTT, the two
    directions' bytes one after the other), ``overlapped`` (every round one way: both parties
    send, then both receive; the directions in parallel), ``pipelined`` (the link's time overlaps
    the computation, as on the offline link)."""
    rtt, rate = shape
    return dict(serial=round(base_s + rounds * rtt + (up + down) * 8 / rate, 2),
                overlapped=round(base_s + rounds * rtt / 2 + max(up, down) * 8 / rate, 2),
                pipelined=round(max(base_s, max(up, down) * 8 / rate) + rounds * rtt / 2, 2))


def summarize(steps, rec: dict, shape, base=None, offline=True) -> dict:
    """Per-token numbers of one profile's ``steps`` (a prefill and/or decode steps) and, with
    ``base`` (the loopback summary), the models' predictions for this profile's shape."""
    dec = [s for s in steps if s["phase"] == "decode"]
    pre = [s for s in steps if s["phase"] == "prefill"]
    out = {}
    if pre:
        out.update(prefill_s=pre[0]["seconds"], prefill_rounds=pre[0]["rounds"],
                   prefill_MiB=round(_nbytes(pre[0]) / 2**20, 2), prefill_up=pre[0]["bytes_to_server"],
                   prefill_down=pre[0]["bytes_to_client"])
    if offline:
        out.update(setup_MiB=round((rec["setup_bytes_to_server"] + rec["setup_bytes_to_client"]) / 2**20, 1),
                   offline_s=rec["offline_s"], offline_MiB=round(rec["offline_bytes"] / 2**20, 1),
                   offline_rounds=rec["offline_rounds"], offline_up=rec["offline_bytes_to_server"],
                   offline_down=rec["offline_bytes_to_client"])
    out.update(decode_s_per_token=round(_mean(s["seconds"] for s in dec), 3),
               decode_s=[s["seconds"] for s in dec], rounds_per_token=round(_mean(s["rounds"] for s in dec), 1),
               MiB_per_token=round(_mean(_nbytes(s) for s in dec) / 2**20, 3),
               up_per_token=round(_mean(s["bytes_to_server"] for s in dec)),
               down_per_token=round(_mean(s["bytes_to_client"] for s in dec)),
               offline_link_MiB_in_decode_steps=round(sum(s["offline_link_bytes"] for s in dec) / 2**20, 1),
               relay_cpu_s_per_token=round(_mean(s["relay_cpu_s"] for s in dec), 3))
    ahead = dec[1:]  # a decode step after a decode step: its dealer items were made between the steps
    if ahead and any(s.get("offline_s") for s in ahead):
        out.update(decode_s_items_ahead=round(_mean(s["seconds"] for s in ahead), 3),
                   offline_s_between_steps=round(_mean(s["offline_s"] for s in ahead), 3))
    if base is None:
        return out
    rtt, rate = shape
    out["predicted_decode_s_per_token"] = _models(base["decode_s_per_token"], out["rounds_per_token"],
                                                  out["up_per_token"], out["down_per_token"], shape)
    out["fitted_s_per_round"] = round((out["decode_s_per_token"] - base["decode_s_per_token"]
                                       - max(out["up_per_token"], out["down_per_token"]) * 8 / rate)
                                      / out["rounds_per_token"], 5)  # with the bytes of the overlapped model
    for phase in ("prefill", "offline"):  # measured here or (session mode) only on loopback
        src = out if f"{phase}_s" in out else base
        if f"{phase}_s" in base:
            out[f"predicted_{phase}_s"] = _models(base[f"{phase}_s"], src[f"{phase}_rounds"], src[f"{phase}_up"],
                                                  src[f"{phase}_down"], shape)
    return out


def main() -> None:
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # as every CryptoGen process does (cryptogen/memory.py)
    from cryptogen.mpc.provider_remote import DEFAULT_STEP_AHEAD
    from cryptogen.net.shaper import PROFILES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "wikitext2"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens (the prefill)")
    ap.add_argument("--tokens", type=int, default=3, help="decode steps per profile")
    ap.add_argument("--providers", default="he", help="comma-separated: he, dealer")
    ap.add_argument("--profiles", default="loopback,lan,wan")
    ap.add_argument("--mode", default="full", choices=("full", "session", "filled"),
                    help="full: one session per profile, every byte shaped (offline, prefill, decode); session: "
                         "one session per provider, offline and prefill on loopback, then --tokens decode steps "
                         "under each profile in turn (shaped offline/prefill times predicted by the model); "
                         "filled: as session, without the prefill (the server's caches start with --context "
                         "positions of encrypted zeros; dealer only)")
    ap.add_argument("--frame-cap-mib", type=int, default=None,
                    help="raise the data links' frame cap (control.link_cap, both sides: computed in this process) "
                         "to at least this; at 128 prompt tokens the prefill's GELU opening of this model is 24.8 MB, "
                         "over the shipped 16 MiB cap")
    ap.add_argument("--step-ahead-mib", type=int, default=DEFAULT_STEP_AHEAD >> 20, help="the dealer's look-ahead between decode steps, MiB "
                    "per kind (cryptogen dealer --step-ahead-mib; 1024: GPT-2 base's whole step, ~1 GB per party)")
    ap.add_argument("--dealer-process", action="store_true", help="run the dealer as its own process (cryptogen "
                    "dealer), as deployed, in place of threads in this one")
    ap.add_argument("--out", default=None, help="JSON file; the entry of this mode and context (\"session-128\") is replaced, others kept")
    a = ap.parse_args()
    providers, profiles = a.providers.split(","), a.profiles.split(",")
    if not set(providers) <= {"he", "dealer"} or not set(profiles) <= {"loopback", *PROFILES} \
            or "loopback" not in profiles:
        ap.error(f"--providers: he, dealer; --profiles: loopback and any of {', '.join(PROFILES)}")
    if a.mode == "filled" and providers != ["dealer"]:
        ap.error("--mode filled runs with --providers dealer only")
    if a.step_ahead_mib < 0:
        ap.error(f"--step-ahead-mib must be 0 or more, got {a.step_ahead_mib}")
    profiles = ["loopback"] + [p for p in profiles if p != "loopback"]
    shapes = {p: PROFILES.get(p, (0.0, float("inf"))) for p in profiles}

    tmp = Path(tempfile.mkdtemp(prefix="cryptogen-network-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")  # the demand forecast: calibrated here, not the user's
    from cryptogen.cluster.connect import shutdown
    from cryptogen.server.serve import ServeOptions, start
    if a.frame_cap_mib:
        from cryptogen.net import control
        cap, shipped = a.frame_cap_mib << 20, control.link_cap
        control.link_cap = lambda *args, **kw: max(shipped(*args, **kw), cap)

    dealer = None
    if "dealer" in providers and a.dealer_process:
        from dealer_process import DealerProcess
        dealer = DealerProcess(tmp / "dealer", a.step_ahead_mib)
    elif "dealer" in providers:
        from cryptogen.dealer.service import DealerServer
        dealer = DealerServer(listen="127.0.0.1:0", state_dir=str(tmp / "dealer"), out_dir=str(tmp / "dealer"),
                              step_ahead_bytes=a.step_ahead_mib << 20).start()
    opts = ServeOptions(model=a.model, workers=a.workers, listen="127.0.0.1:0",
                        connection_file=str(tmp / "server.json"),
                        state_dir=str(tmp / "state"), num_cpus=a.workers + 2,
                        dealer=str(dealer.server_file) if dealer else None)
    t_start = time.perf_counter()
    gw, pool, _, _ = start(opts)
    if a.mode == "filled":
        zero_caches(gw, a.context)
    relays = Relays()
    log = lambda m: print(f"[bench_network] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        import cryptogen.client.remote as remote
        with remote.connect(opts.connection_file) as c:
            cfg = c.cfg
            ids = []
            while c.tokenizer is not None and len(ids) < a.context:
                ids += c.encode(LOREM)
            if c.tokenizer is None:  # a checkpoint without a tokenizer (cryptogen init): fixed token ids
                ids = [(1 + 7919 * i) % cfg.vocab_size for i in range(a.context)]
            ids = ids[:a.context]
        dealer_file = str(dealer.client_file) if dealer else None
        runs, summary = {}, {}
        for provider in providers:
            if provider == "he":  # calibrate the demand forecast: the measured runs make their randomness up front
                t0 = time.perf_counter()
                run_session(opts.connection_file, dealer_file, ids[:4], provider, "calibration",
                            [("loopback", shapes["loopback"])] * 4, relays)
                log(f"he: demand forecast calibrated in {time.perf_counter() - t0:.0f} s")
            if a.mode in ("session", "filled"):
                t0 = time.perf_counter()
                # decode steps round-robin over the profiles: a load spike on the shared machine hits all alike
                plan = [("loopback", shapes["loopback"])] * (a.mode == "session") + \
                    [(p, shapes[p]) for _ in range(a.tokens) for p in profiles]
                rec = runs[provider] = run_session(opts.connection_file, dealer_file, ids, provider, "session",
                                                   plan, relays, filled=a.mode == "filled")
                base = None
                for p in profiles:
                    s = summary[f"{provider}/{p}"] = summarize([st for st in rec["steps"] if st["profile"] == p],
                                                               rec, shapes[p], base, offline=p == "loopback")
                    base = base or s
                log(f"{provider} session ({time.perf_counter() - t0:.0f} s): {json.dumps(summary)}")
                continue
            base = None
            for p in profiles:
                t0 = time.perf_counter()
                rec = runs[f"{provider}/{p}"] = run_session(opts.connection_file, dealer_file, ids, provider, p,
                                                            [(p, shapes[p])] * (a.tokens + 1), relays)
                s = summary[f"{provider}/{p}"] = summarize(rec["steps"], rec, shapes[p], base)
                base = base or s
                log(f"{provider}/{p} ({time.perf_counter() - t0:.0f} s): {json.dumps(s)}")
        same = len({tuple(r["tokens"][:a.tokens + 1]) for r in runs.values()}) == 1
        entry = dict(command="nice -n 5 python scripts/bench_network.py " + " ".join(sys.argv[1:]),
                     date=str(date.today()), wall_minutes=round((time.perf_counter() - t_start) / 60, 1),
                     machine=f"{platform.machine()} {os.cpu_count()} cpus (shared), load average "
                             f"{os.getloadavg()[0]:.1f} at the end",
                     model=dict(name=Path(a.model).name, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                vocab=cfg.vocab_size),
                     workers=a.workers, context=a.context, frame_cap_mib=a.frame_cap_mib,
                     decode_tokens_per_profile=a.tokens,
                     profiles={p: dict(rtt_s=shapes[p][0], rate_bps=shapes[p][1]) for p in profiles if p in PROFILES},
                     same_tokens=same, summary=summary, runs=runs, peak_rss_mib=peak_rss_parties(getattr(dealer, "pid", None)))
        print(json.dumps(entry, indent=1))
        if a.out:
            path = Path(a.out)
            doc = json.loads(path.read_text()) if path.is_file() else {}
            doc[f"{a.mode}-{a.context}"] = entry
            path.write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        relays.close()
        gw.close()
        pool.shutdown()
        shutdown()
        if dealer:
            dealer.stop()


if __name__ == "__main__":
    main()
