"""Correlated-randomness providers side by side: dealer vs dealer-free HE with pre-filled pools.

    .venv/bin/python scripts/bench_providers.py [--model wikitext2] [--tokens 3] [--out r.json]

In-process (scheduler/inprocess.py + cryptogen/driver.py, 1 worker, both parties as threads of
this process), on a shipped model: prefill of the prompt, then ``--tokens - 1`` decode steps.

1. ``dealer`` (as deployed today: the dealer's bundles are made on demand, inside the online
   path): per phase, wall and process-CPU seconds, online bytes, randomness consumed.
   This run also measures the demand of every phase.
2. ``dealer-prefilled``: both pools filled with exactly that demand before the prompt
   (``preprocess``); 3. ``he`` (``HEProvider(offline=channel_pair(), lookahead=0)``): the
   offline link fills both pools with the same demand (offline wall/CPU seconds and bytes
   reported). Then 2 and 3 generate side by side, phase by phase, alternating which goes
   first (machine load hits both alike); ``he`` produces nothing during it (checked).
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
from cryptogen.driver import Driver
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.plan import make_plan


def _online_bytes(party) -> int:
    st = party.chan.stats["online"]
    return st.bytes_sent + st.bytes_recv


class Run:
    """One provider's in-process runner, stepped phase by phase (prefill, then decode steps)."""

    def __init__(self, name, model, ids, factory, demand=None):
        self.name, self.cfg, self.n_prompt = name, model.config, len(ids)
        self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, 1)
        self.runner = InProcessRunner(model, self.plan, ids, provider_factory=factory)
        self.driver, self.cp = Driver(self.runner, self.cfg, self.plan), self.runner.client_parties[0]
        self.rec, self.phases = dict(provider=name), []
        if demand:  # both parties fill their pools with the measured demand before the prompt
            c, s = self.cp.cr, self.runner.server_parties[0].cr
            w0, p0 = time.perf_counter(), time.process_time()
            th = threading.Thread(target=s.preprocess, kwargs=dict(triples=demand["triple"], bits=demand["bits"]))
            th.start()
            c.preprocess(triples=demand["triple"], bits=demand["bits"])
            th.join()
            self.rec.update(offline_wall_s=time.perf_counter() - w0, offline_cpu_s=time.process_time() - p0)
        self.produced0 = dict(self.cp.cr.counters()["produced"])

    def step(self, i: int) -> None:
        c0 = dict(self.cp.cr.counters()["consumed"])
        b0, w0, p0 = _online_bytes(self.cp), time.perf_counter(), time.process_time()
        st = self.driver.prefill(self.n_prompt) if i == 0 else self.driver.decode_one_token(self.n_prompt + i - 1)
        c1 = self.cp.cr.counters()["consumed"]
        self.phases.append(dict(phase=st.phase, wall_s=time.perf_counter() - w0, cpu_s=time.process_time() - p0,
                                online_bytes=_online_bytes(self.cp) - b0,
                                consumed={k: c1[k] - c0.get(k, 0) for k in c1}))

    def finish(self) -> dict:
        cnt = self.cp.cr.counters()
        self.rec["produced_online"] = {k: v - self.produced0.get(k, 0) for k, v in cnt["produced"].items()
                                       if v - self.produced0.get(k, 0)}
        if "offline" in cnt:
            srv = self.runner.server_parties[0].cr.counters()
            self.rec["offline_link"] = dict(client=cnt["offline"], server=srv["offline"], wait_s=cnt["wait_s"])
        self.rec.update(phases=self.phases, tokens=self.runner.client.generated)
        for p in (self.cp, self.runner.server_parties[0]):
            if hasattr(p.cr, "close"):
                p.cr.close()
        return self.rec


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
        s["offline_MB_client_to_server"] = ol["client"]["bytes_sent"] / 1e6
        s["offline_MB_server_to_client"] = ol["client"]["bytes_recv"] / 1e6
        s["offline_producer_cpu_s_client_server"] = (ol["client"]["cpu_s"], ol["server"]["cpu_s"])
        s["online_wait_s"] = ol["wait_s"]
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
    dealer = Run("dealer", model, ids, DealerProvider)  # as deployed: bundles made on demand
    for i in range(a.tokens):
        dealer.step(i)
    rec["runs"].append(dealer.finish())
    demand: dict = {}
    for p in dealer.phases:
        for k, v in p["consumed"].items():
            demand[k] = demand.get(k, 0) + v
    rec["demand"] = demand
    pair = [Run("dealer-prefilled", model, ids, DealerProvider, demand),
            Run("he", model, ids, lambda: HEProvider(offline=channel_pair(timeout=600), lookahead=0), demand)]
    for i in range(a.tokens):  # side by side: alternate which provider steps first
        for r in (pair if i % 2 == 0 else pair[::-1]):
            r.step(i)
    rec["runs"] += [r.finish() for r in pair]
    assert not rec["runs"][-1]["produced_online"], "the he pool was refilled during the online phase"
    if a.cold:
        cold = Run("he-cold", model, ids, lambda: HEProvider(offline=channel_pair(timeout=600)))
        for i in range(a.tokens):
            cold.step(i)
        rec["runs"].append(cold.finish())
    rec["summary"] = [summary(r) for r in rec["runs"]]
    by = {s["provider"]: s for s in rec["summary"]}
    rec["ratio_he_over_dealer"] = {
        f"{k}_{base}": by["he"][k] / by[base][k] for base in ("dealer", "dealer-prefilled")
        for k in ("prefill_wall_s", "decode_wall_s", "prefill_cpu_s", "decode_cpu_s") if by[base].get(k)}
    d_ph, h_ph = rec["runs"][1]["phases"], rec["runs"][2]["phases"]
    rec["paired_ratio_he_over_dealer_prefilled"] = [
        dict(phase=d["phase"], wall=h["wall_s"] / d["wall_s"], cpu=h["cpu_s"] / d["cpu_s"]) for d, h in zip(d_ph, h_ph)]
    rec["same_tokens"] = len({tuple(r["tokens"]) for r in rec["runs"]}) == 1
    print(json.dumps(dict(summary=rec["summary"], ratio=rec["ratio_he_over_dealer"], demand=demand,
                          paired=rec["paired_ratio_he_over_dealer_prefilled"], same_tokens=rec["same_tokens"],
                          tokens=rec["runs"][0]["tokens"]), indent=1, default=float))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1, default=float)


if __name__ == "__main__":
    main()
