"""Correlated-randomness providers side by side: dealer vs dealer-free HE with pre-filled pools.

    .venv/bin/python scripts/bench_providers.py [--model wikitext2] [--tokens 3] [--out r.json]

In-process (scheduler/inprocess.py + scheduler/driver.py, 1 worker, both parties as threads of
this process), on a shipped model: prefill of the prompt, then ``--tokens - 1`` decode steps.

1. ``dealer`` (as deployed today: the dealer's bundles are made on demand, inside the online
   path): per phase, wall and process-CPU seconds, online bytes, randomness consumed.
   This run also measures the demand of every phase.
2. ``dealer-prefilled``: both pools filled with exactly that demand before the prompt
   (``preprocess``), then the same generation.
3. ``he`` (``HEProvider(offline=channel_pair(), lookahead=0)``): the offline link fills both
   pools with the same demand before the prompt (offline wall/CPU seconds and bytes reported),
   then the same generation, with no production during it (checked).
4. with ``--cold``: ``he`` with its default look-ahead and no pre-fill (production inside the
   online path as the background producer races the protocols), for reference.
Online = the wall time of the driver's prefill / decode steps. CPU = process CPU (both parties
and every thread, this process only), less noisy than wall on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import threading
import time

import numpy as np

from cryptogen import registry
from cryptogen.mpc.channel import channel_pair
from cryptogen.mpc.provider import DealerProvider
from cryptogen.mpc.provider_he import HEProvider
from cryptogen.scheduler.driver import Driver
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.scheduler.plan import make_plan


def _online_bytes(party) -> int:
    st = party.chan.stats["online"]
    return st.bytes_sent + st.bytes_recv


def _both(runner, fn) -> None:
    c, s = runner.client_parties[0].cr, runner.server_parties[0].cr
    th = threading.Thread(target=fn, args=(s,))
    th.start()
    fn(c)
    th.join()


def generate(runner, cfg, plan, n_prompt: int, tokens: int) -> list[dict]:
    """Prefill + decode steps; per phase: wall, CPU, online bytes (client end), consumed."""
    d, cp = Driver(runner, cfg, plan), runner.client_parties[0]
    phases = []
    for i in range(tokens):
        c0 = dict(cp.cr.counters()["consumed"])
        b0, w0, p0 = _online_bytes(cp), time.perf_counter(), time.process_time()
        st = d.prefill(n_prompt) if i == 0 else d.decode_one_token(n_prompt + i - 1)
        c1 = cp.cr.counters()["consumed"]
        phases.append(dict(phase=st.phase, wall_s=time.perf_counter() - w0, cpu_s=time.process_time() - p0,
                           online_bytes=_online_bytes(cp) - b0,
                           consumed={k: c1[k] - c0.get(k, 0) for k in c1}))
    return phases


def run(name, model, tok_ids, tokens, factory, demand=None):
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, tok_ids, provider_factory=factory)
    out = dict(provider=name)
    if demand:
        w0, p0 = time.perf_counter(), time.process_time()
        _both(runner, lambda src: src.preprocess(triples=demand.get("triple", 0), bits=demand.get("bits", 0)))
        out["offline_wall_s"], out["offline_cpu_s"] = time.perf_counter() - w0, time.process_time() - p0
    before = dict(runner.client_parties[0].cr.counters().get("produced", {}))
    out["phases"] = generate(runner, cfg, plan, len(tok_ids), tokens)
    cnt = runner.client_parties[0].cr.counters()
    out["produced_online"] = {k: v - before.get(k, 0) for k, v in cnt["produced"].items() if v - before.get(k, 0)}
    if "offline" in cnt:
        srv = runner.server_parties[0].cr.counters()
        out["offline_link"] = dict(client=cnt["offline"], server=srv["offline"], wait_s=cnt["wait_s"])
    out["tokens"] = runner.client.generated
    for p in (runner.client_parties[0], runner.server_parties[0]):
        close = getattr(p.cr, "close", None)
        if close:
            close()
    return out


def summary(r: dict) -> dict:
    dec = [p for p in r["phases"] if p["phase"] == "decode"]
    s = dict(provider=r["provider"], prefill_wall_s=r["phases"][0]["wall_s"], prefill_cpu_s=r["phases"][0]["cpu_s"],
             decode_wall_s=float(np.mean([p["wall_s"] for p in dec])) if dec else None,
             decode_cpu_s=float(np.mean([p["cpu_s"] for p in dec])) if dec else None,
             decode_online_MB=float(np.mean([p["online_bytes"] for p in dec])) / 1e6 if dec else None)
    for k in ("offline_wall_s", "offline_cpu_s"):
        if k in r:
            s[k] = r[k]
    if "offline_link" in r:
        ol = r["offline_link"]
        s["offline_MB_each_way"] = (ol["client"]["bytes_sent"] / 1e6, ol["client"]["bytes_recv"] / 1e6)
        s["offline_cpu_s_client_server"] = (ol["client"]["cpu_s"], ol["server"]["cpu_s"])
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wikitext2")
    ap.add_argument("--prompt", default="The history of the")
    ap.add_argument("--tokens", type=int, default=3, help="generated tokens (the first comes from the prefill)")
    ap.add_argument("--cold", action="store_true", help="also run he without pre-fill (default look-ahead)")
    ap.add_argument("--out", help="write the full record as JSON")
    a = ap.parse_args(argv)
    model, tok, _ = registry.load(a.model)
    ids = tok.encode(a.prompt).ids
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rec = dict(model=a.model, prompt=a.prompt, prompt_tokens=len(ids), tokens=a.tokens, commit=commit,
               machine=f"{platform.platform()}, {platform.processor() or platform.machine()}",
               date=time.strftime("%Y-%m-%d %H:%M"), runs=[])
    dealer = run("dealer", model, ids, a.tokens, DealerProvider)
    demand = {}
    for p in dealer["phases"]:
        for k, v in p["consumed"].items():
            demand[k] = demand.get(k, 0) + v
    rec["demand"] = demand
    rec["runs"].append(dealer)
    rec["runs"].append(run("dealer-prefilled", model, ids, a.tokens, DealerProvider, demand))
    he = run("he", model, ids, a.tokens, lambda: HEProvider(offline=channel_pair(timeout=600), lookahead=0), demand)
    assert not he["produced_online"], "the he pool was refilled during the online phase"
    rec["runs"].append(he)
    if a.cold:
        rec["runs"].append(run("he-cold", model, ids, a.tokens, lambda: HEProvider(offline=channel_pair(timeout=600))))
    rec["summary"] = [summary(r) for r in rec["runs"]]
    by = {s["provider"]: s for s in rec["summary"]}
    rec["ratio_he_over_dealer"] = {
        f"{k}_{base}": by["he"][k] / by[base][k] for base in ("dealer", "dealer-prefilled")
        for k in ("prefill_wall_s", "decode_wall_s", "prefill_cpu_s", "decode_cpu_s") if by[base].get(k)}
    rec["same_tokens"] = len({tuple(r["tokens"]) for r in rec["runs"]}) == 1
    print(json.dumps(dict(summary=rec["summary"], ratio=rec["ratio_he_over_dealer"], demand=demand,
                          same_tokens=rec["same_tokens"], tokens=dealer["tokens"]), indent=1, default=float))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1, default=float)


if __name__ == "__main__":
    main()
