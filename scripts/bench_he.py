#!/usr/bin/env python
"""HE engine microbenchmark (not a test): per-kernel time and op counts per decoded token.

Shapes: GPT-2-base (d=768, 12 heads, d_head=64) and small (d=128, 4 heads, d_head=32,
vocab 4096). Attention is measured for one head at 128/256/512 cached tokens and scaled by
the head count for per-layer numbers. Prints a table, writes JSON (default docs/bench/he.json).
Usage: python scripts/bench_he.py [--out PATH] [--contexts 128 256 512] [--shapes small gpt2]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from cryptogen.field import random_elements
from cryptogen.he import (ClientKeys, ClientRole, EncodedLinear, EncryptedKVCache, HEConfig, KVLayout, ServerEngine,
                          h2s_server, matmul_ct_pt_decode, plan_linear, probs_slots, pv_decode, qk_decode,
                          query_slots, required_rotation_steps)

SHAPES = {
    "small": dict(d=128, heads=4, d_head=32, vocab=4096),
    "gpt2": dict(d=768, heads=12, d_head=64, vocab=None),  # LM head (50257) left out: time budget
}


def linears(s):
    d = s["d"]
    out = {"qkv": (d, 3 * d), "attn_out": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    if s["vocab"]:
        out["lm_head"] = (d, s["vocab"])
    return out


def timed(engine, fn, reps=1):
    before = engine.stats.snapshot()
    t0 = time.perf_counter()
    for _ in range(reps):
        res = fn()
    dt = (time.perf_counter() - t0) / reps
    ops = engine.stats.diff(before).as_dict()
    return res, dt, {k: v // reps for k, v in ops.items() if v}


def bench_shape(name, s, cfg, contexts, rng):
    plans = {k: plan_linear(a, b, cfg.n) for k, (a, b) in linears(s).items()}
    lay = KVLayout(s["d_head"], cfg.n)
    t0 = time.perf_counter()
    keys = ClientKeys.generate(cfg, required_rotation_steps(plans.values()))
    ctx_bytes = keys.public_context_bytes()
    keygen = time.perf_counter() - t0
    eng, cl = ServerEngine(keys.public_context()), ClientRole(keys)
    res = {"shape": s, "keygen_s": keygen, "public_context_bytes": len(ctx_bytes),
           "galois_keys": len(keys.rotation_steps), "linear": {}, "attention": {}}
    for k, plan in plans.items():
        W = random_elements((plan.d_in, plan.d_out), cfg.t, rng)
        t1 = time.perf_counter()
        enc = EncodedLinear(eng, W, plan)
        enc_s = time.perf_counter() - t1
        x = eng.receive(cl.s2h_send(plan.input_slots_decode(random_elements(plan.d_in, cfg.t, rng))))
        outs, dt, ops = timed(eng, lambda: matmul_ct_pt_decode(enc, x))
        _, dt_h2s, _ = timed(eng, lambda: [h2s_server(eng, o) for o in outs])
        res["linear"][k] = {"d_in": plan.d_in, "d_out": plan.d_out, "ct_pt": ops.get("ct_pt_mul", 0),
                            "ideal_ceil_din_dout_over_n": plan.ideal_ct_pt, "rotations": ops.get("rotations", 0),
                            "output_cts": len(outs), "time_s": dt, "h2s_time_s": dt_h2s, "encode_weights_s": enc_s,
                            "plan": {"g": plan.g, "C": plan.C, "P": plan.P, "g1": plan.g1, "lanes": plan.lanes}}
        print(f"  {name:5s} {k:9s} {plan.d_in:5d}x{plan.d_out:<5d} ct*pt {ops.get('ct_pt_mul', 0):4d} "
              f"(ideal {plan.ideal_ct_pt:4d}) rot {ops.get('rotations', 0):3d} outs {len(outs)} "
              f"{dt * 1e3:8.1f} ms  +H2S {dt_h2s * 1e3:6.1f} ms", flush=True)
    for T in contexts:
        cache = EncryptedKVCache(eng, s["d_head"])
        K = random_elements((T, s["d_head"]), cfg.t, rng)
        runs = lay.run_slots(0, K)
        cache.prefill(0, [cl.s2h_send(sl) for _, sl in runs], K * 0, [cl.s2h_send(sl) for _, sl in runs], K * 0)
        q = eng.receive(cl.s2h_send(query_slots(lay, K[0])))
        q_s = np.zeros((1, s["d_head"]), np.int64)  # the server's query share (the client's in q)
        sc, dt_qk, ops_qk = timed(eng, lambda: qk_decode(eng, cache, q, q_s, cl))
        p = random_elements(T, cfg.t, rng)
        ps = [eng.receive(cl.s2h_send(probs_slots(lay, p, c))) for c in range(len(cache.v))]
        o, dt_pv, ops_pv = timed(eng, lambda: pv_decode(eng, cache, ps, np.zeros((1, T), np.int64), cl))
        _, dt_ex, ops_ex = timed(eng, lambda: [h2s_server(eng, c) for c in sc + [o]])
        kv_bytes_tok_layer = cache.nbytes() / T * s["heads"]
        res["attention"][T] = {
            "per_head": {"qk": {"time_s": dt_qk, **ops_qk}, "pv": {"time_s": dt_pv, **ops_pv},
                         "h2s_outputs": {"time_s": dt_ex, **ops_ex},
                         "client_cts_in": 1 + len(ps)},
            "per_layer_time_s": (dt_qk + dt_pv + dt_ex) * s["heads"],
            "kv_bytes_per_token_per_layer": kv_bytes_tok_layer,
            "cache_cts_per_head": cache.ciphertext_count()}
        print(f"  {name:5s} attn T={T:4d} per head: qK {dt_qk * 1e3:7.1f} ms ({ops_qk.get('ct_pt_mul', 0)} ct*pt, "
              f"{ops_qk.get('rotations', 0)} rot)  pV {dt_pv * 1e3:7.1f} ms ({ops_pv.get('ct_pt_mul', 0)} ct*pt, "
              f"{ops_pv.get('rotations', 0)} rot)  H2S {dt_ex * 1e3:6.1f} ms; per layer "
              f"{(dt_qk + dt_pv + dt_ex) * s['heads']:6.2f} s; KV {kv_bytes_tok_layer / 1024:7.1f} KiB/token/layer",
              flush=True)
    lin = sum(v["time_s"] + v["h2s_time_s"] for k, v in res["linear"].items() if k != "lm_head")
    res["per_token_per_layer_s"] = {T: lin + a["per_layer_time_s"] for T, a in res["attention"].items()}
    return res


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bench/he.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--shapes", nargs="+", default=["small", "gpt2"], choices=sorted(SHAPES))
    args = ap.parse_args(argv)
    cfg = HEConfig()
    rng = np.random.default_rng(0)
    out = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "config": cfg.to_dict(), "shapes": {}}
    t0 = time.perf_counter()
    for name in args.shapes:
        print(f"== {name} {SHAPES[name]}", flush=True)
        out["shapes"][name] = bench_shape(name, SHAPES[name], cfg, args.contexts, rng)
    out["total_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out} in {out['total_s']:.0f} s")


if __name__ == "__main__":
    main()
