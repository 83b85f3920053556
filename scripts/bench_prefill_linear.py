#!/usr/bin/env python
"""Batched prefill of the linear layers against the decode encoding per token, in one run (issue #11).

For each shape (one layer's qkv, W_o, fc1, fc2 and one embedding shard; the shipped WikiText-2
model and GPT-2 base) and each prompt length T: the whole linear protocol in one process, both
parties' CPU (client encryption, S2H, the server's products and rotations, H2S with flooding,
client decryption), without the network:
  * blocked: ``he.blocked`` on all T tokens, diagonals encoded inside the timed call, output
    checked equal to X W mod t;
  * per token: the decode encoding on --sample tokens (median), times T.
The per-model sum weights each shape by how often a prefill runs it (layers; embedding shards).
Writes JSON and a Markdown table.

    .venv/bin/python scripts/bench_prefill_linear.py [--models shipped,gpt2] [--tokens 128,512] \
        [--sample 3] [--cpu N] [--out docs/bench/prefill_linear.json]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse, json, platform, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_linear_kernels import COUNTS, check_and_pin, sh  # noqa: E402

SHAPES = {"shipped": {"qkv": (128, 384), "o": (128, 128), "fc1": (128, 512), "fc2": (512, 128),
                      "embed shard": (2048, 128)},
          "gpt2": {"qkv": (768, 2304), "o": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768),
                   "embed shard": (2560, 768)}}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors
        sys.exit(f"bench_prefill_linear.py: error: {message}")


def log(msg):
    print(f"[prefill_linear] {msg}", file=sys.stderr, flush=True)


def _ints(text, what, p):
    try:
        vals = [int(v) for v in text.split(",") if v]
    except ValueError:
        p.error(f"{what} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 2:
        p.error(f"{what} must be integers >= 2, got {text!r}")
    return vals


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped,gpt2", help="comma-separated: shipped, gpt2")
    p.add_argument("--tokens", default="128,512", help="prompt lengths T (comma-separated, >= 2)")
    p.add_argument("--sample", type=int, default=3, help="tokens timed with the per-token encoding (>= 1)")
    p.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    p.add_argument("--out", default="docs/bench/prefill_linear.json")
    args = p.parse_args(argv)
    models, out_path = [m for m in args.models.split(",") if m], Path(args.out)
    tokens = _ints(args.tokens, "--tokens", p)
    check_and_pin(p, args, models, SHAPES, out_path, (args.sample < 1, f"--sample must be at least 1, got {args.sample}"))
    import numpy as np
    from cryptogen.field import matmul, random_elements
    from cryptogen.he import (ClientKeys, ClientRole, EncodedLinear, HEConfig, ServerEngine, block_plan, h2s_server,
                              matmul_blocked, matmul_ct_pt_decode, plan_linear, required_rotation_steps, s2h_server)

    cfg, rng, t0 = HEConfig(), np.random.default_rng(7), time.perf_counter()
    plans = {(m, name): plan_linear(*shape, cfg.n) for m in models for name, shape in SHAPES[m].items()}
    steps = required_rotation_steps(plans.values())
    log(f"keys with {len(steps)} Galois steps")
    keys = ClientKeys.generate(cfg, steps)
    ctx, client, t = keys.public_context(), ClientRole(keys), cfg.t
    rows, totals = [], {}
    for (m, name), plan in plans.items():
        W = random_elements(SHAPES[m][name], t, rng)
        engine = ServerEngine(ctx)
        enc = EncodedLinear(engine, W, plan)
        per_token = []
        for _ in range(args.sample + 1):  # the first is a warm-up
            x = random_elements(plan.d_in, t, rng)
            xs = random_elements(plan.d_in, t, rng)
            s = time.perf_counter()
            c = s2h_server(engine, client.s2h_send(plan.input_slots_decode((x - xs) % t)), plan.input_slots_decode(xs))
            shares = [h2s_server(engine, y) for y in matmul_ct_pt_decode(enc, c)]
            plan.read_output_decode([client.h2s_receive(d) for d, _ in shares], t)
            per_token.append(time.perf_counter() - s)
        tok_s = sorted(per_token[1:])[len(per_token[1:]) // 2]
        bp = block_plan(plan.d_in, plan.d_out, cfg.n)
        for T in tokens:
            X, Xs = random_elements((T, plan.d_in), t, rng), random_elements((T, plan.d_in), t, rng)
            before = (engine.stats.ct_pt_mul, engine.stats.rotations)
            s = time.perf_counter()
            cts = [[s2h_server(engine, client.s2h_send(xc), xsv) for xc, xsv in zip(cc, cs)]
                   for cc, cs in zip(bp.input_slots((X - Xs) % t), bp.input_slots(Xs))]
            shares = [h2s_server(engine, y) for y in matmul_blocked(enc, bp, cts)]
            Yc = bp.read_output([client.h2s_receive(d) for d, _ in shares], T, t)
            blocked_s = time.perf_counter() - s
            Ys = bp.read_output([r for _, r in shares], T, t)
            ok = bool(np.array_equal((Yc + Ys) % t, matmul(X, W, t)))
            row = {"model": m, "layer": name, "d_in": plan.d_in, "d_out": plan.d_out, "T": T, "tb": bp.tb, "g1": bp.g1,
                   "blocked_s": round(blocked_s, 2), "per_token_s": round(tok_s * T, 2),
                   "speedup": round(tok_s * T / blocked_s, 2), "exact": ok,
                   "blocked_ct_pt_per_token": round((engine.stats.ct_pt_mul - before[0]) / T, 1),
                   "decode_ct_pt_per_token": plan.decode_ct_pt,
                   "blocked_rotations_per_token": round((engine.stats.rotations - before[1]) / T, 2),
                   "decode_rotations_per_token": plan.decode_rotations(),
                   "blocked_outputs_per_token": round(len(shares) / T, 3), "decode_outputs_per_token": plan.decode_outputs,
                   "runs_per_prefill": COUNTS[m][name]}
            rows.append(row)
            tot = totals.setdefault(f"{m} T={T}", {"blocked_s": 0.0, "per_token_s": 0.0})
            tot["blocked_s"] += COUNTS[m][name] * blocked_s
            tot["per_token_s"] += COUNTS[m][name] * tok_s * T
            log(f"{m} {name} T={T}: blocked {row['blocked_s']} s, per token x T {row['per_token_s']} s "
                f"({row['speedup']}x), exact: {ok}")
        del enc
    for tot in totals.values():
        tot["speedup"] = round(tot["per_token_s"] / tot["blocked_s"], 2)
        for k in ("blocked_s", "per_token_s"):
            tot[k] = round(tot[k], 1)
    rec = {"command": " ".join([".venv/bin/python", "scripts/bench_prefill_linear.py"] + sys.argv[1:]),
           "date": sh("date", "-u", "+%F %H:%M"), "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "pinned_cpu": args.cpu},
           "n": cfg.n, "sample": args.sample, "rows": rows, "prefill_linear_totals": totals,
           "wall_s": round(time.perf_counter() - t0, 1)}
    out_path.write_text(json.dumps(rec, indent=2) + "\n")
    md = ["| model | layer | T | blocked s | per token × T s | speedup | ct×pt / token (blocked, decode) | "
          "rotations / token | outputs / token | exact |", "|---|---|---:|---:|---:|---:|---|---|---|---|"]
    md += [f"| {r['model']} | {r['layer']} | {r['T']} | {r['blocked_s']} | {r['per_token_s']} | {r['speedup']} | "
           f"{r['blocked_ct_pt_per_token']}, {r['decode_ct_pt_per_token']} | {r['blocked_rotations_per_token']}, "
           f"{r['decode_rotations_per_token']} | {r['blocked_outputs_per_token']}, {r['decode_outputs_per_token']} | "
           f"{r['exact']} |" for r in rows]
    md += ["", "| prefill (all layers and embedding shards) | blocked s | per token × T s | speedup |", "|---|---:|---:|---:|"]
    md += [f"| {k} | {v['blocked_s']} | {v['per_token_s']} | {v['speedup']} |" for k, v in totals.items()]
    out_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    log(f"wrote {out_path} and {out_path.with_suffix('.md')} in {rec['wall_s']} s; {totals}")


if __name__ == "__main__":
    main()
