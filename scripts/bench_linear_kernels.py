#!/usr/bin/env python
"""Whole linear layers under HE, the kernels side by side in one run (issue #11).

For each shape (the shipped WikiText-2 model's layers and vocabulary, and GPT-2 base's), one
decode mat-vec ``matmul_ct_pt_decode`` (baby rotations, products, giant rotations; no export)
with the ``seal`` kernel (Pyfhel multiply_plain per term, SEAL's rotations), the ``ntt`` kernel
(he/ntt.py) with SEAL's rotations, and the ``ntt`` kernel with hoisted baby steps and summed giant
steps (he/hoist.py: the context keeps the plans' keys, as a worker's does), alternating, median of
--repeats after one warm-up. The outputs of the first two are checked equal word for word, the
third's decrypt to the same slots. Writes JSON and a Markdown table.

    .venv/bin/python scripts/bench_linear_kernels.py [--models shipped,gpt2] [--repeats 5] [--cpu N] \
        [--out docs/bench/linear_kernels.json]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse, json, platform, subprocess, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# (d_in, d_out) per model: qkv, W_o, fc1, fc2 of one layer (one worker), one embedding shard, LM head
# embedding shards as secure_plan.embed_rows cuts them: 2 x 2048 rows (shipped), 20 x 2560 (GPT-2 base)
SHAPES = {"shipped": {"qkv": (128, 384), "o": (128, 128), "fc1": (128, 512), "fc2": (512, 128),
                      "embed shard": (2048, 128), "head": (128, 4096)},
          "gpt2": {"qkv": (768, 2304), "o": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768),
                   "embed shard": (2560, 768), "head": (768, 50257)}}
# per token: how often each shape runs (layers; embedding shards)
COUNTS = {"shipped": {"qkv": 2, "o": 2, "fc1": 2, "fc2": 2, "embed shard": 2, "head": 1},
          "gpt2": {"qkv": 12, "o": 12, "fc1": 12, "fc2": 12, "embed shard": 20, "head": 1}}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors
        sys.exit(f"bench_linear_kernels.py: error: {message}")


def log(msg):
    print(f"[linear_kernels] {msg}", file=sys.stderr, flush=True)


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def check_and_pin(p, args, models, shapes, out_path, *extra) -> None:
    """One-line errors for --models, --cpu, --out and the script's own ``extra`` (bad, message) checks;
    then pin the process to --cpu."""
    for bad, msg in ((not models or any(m not in shapes for m in models), f"--models must name some of {', '.join(shapes)}"),
                     *extra,
                     (args.cpu is not None and args.cpu not in os.sched_getaffinity(0), f"--cpu {args.cpu} is not available"),
                     (not out_path.parent.is_dir(), f"--out: directory {out_path.parent} does not exist")):
        if bad:
            p.error(msg)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped,gpt2", help="comma-separated: shipped, gpt2")
    p.add_argument("--repeats", type=int, default=5, help="timed mat-vecs per kernel and shape (>= 1)")
    p.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    p.add_argument("--out", default="docs/bench/linear_kernels.json")
    args = p.parse_args(argv)
    models, out_path = [m for m in args.models.split(",") if m], Path(args.out)
    check_and_pin(p, args, models, SHAPES, out_path, (args.repeats < 1, f"--repeats must be at least 1, got {args.repeats}"))
    import numpy as np
    from cryptogen.field import random_elements
    from cryptogen.he import ClientKeys, EncodedLinear, HEConfig, ServerEngine, matmul_ct_pt_decode, plan_linear

    cfg, rng, t0 = HEConfig(), np.random.default_rng(5), time.perf_counter()
    plans = {(m, name): plan_linear(*shape, cfg.n) for m in models for name, shape in SHAPES[m].items()}
    steps = set().union(*(pl.rotation_steps() for pl in plans.values()))
    log(f"keys with {len(steps)} Galois steps")
    keys = ClientKeys.generate(cfg, steps)
    plain = keys.public_context()
    plain.hoist_keys = {}  # SEAL's rotations only
    hoisted = keys.public_context(set().union(*(pl.giant_steps() for pl in plans.values())))
    kernels = {"seal": ("seal", plain), "ntt": ("ntt", plain), "hoisted": ("ntt", hoisted)}
    rows, per_model = [], {m: {k: 0.0 for k in kernels} for m in models}
    for (m, name), plan in plans.items():
        W = random_elements(SHAPES[m][name], cfg.t, rng)
        upload = keys.encrypt_to_bytes(plan.input_slots_decode(random_elements(plan.d_in, cfg.t, rng)))
        engines = {k: ServerEngine(c) for k, (_kern, c) in kernels.items()}
        encs = {k: EncodedLinear(engines[k], W, plan, kernel=kern) for k, (kern, _c) in kernels.items()}
        xs = {k: engines[k].receive(upload) for k in kernels}
        outs = {k: matmul_ct_pt_decode(encs[k], xs[k]) for k in encs}  # warm-up, and the equality checks
        same = [a.ct.to_bytes("none") for a in outs["seal"]] == [b.ct.to_bytes("none") for b in outs["ntt"]]
        same_hoisted = all((keys.decrypt(a.ct) == keys.decrypt(b.ct)).all() for a, b in zip(outs["seal"], outs["hoisted"]))
        times = {k: [] for k in encs}
        for _ in range(args.repeats):
            for k, enc in encs.items():
                s = time.perf_counter()
                matmul_ct_pt_decode(enc, xs[k])
                times[k].append(time.perf_counter() - s)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        row = {"model": m, "layer": name, "d_in": plan.d_in, "d_out": plan.d_out, "ct_pt": plan.decode_ct_pt,
               "rotations": plan.decode_rotations(), "babies": plan.g1, "giant_steps": plan.decode_outputs * plan.g2,
               "outputs": plan.decode_outputs, "seal_ms": round(med["seal"], 1), "ntt_ms": round(med["ntt"], 1),
               "hoisted_ms": round(med["hoisted"], 1), "speedup": round(med["seal"] / med["ntt"], 2),
               "hoisting_speedup": round(med["ntt"] / med["hoisted"], 2), "same_ciphertexts": same,
               "same_plaintexts_hoisted": bool(same_hoisted), "per_token": COUNTS[m][name]}
        for k in kernels:
            per_model[m][k] += COUNTS[m][name] * med[k] / 1e3
        rows.append(row)
        log(f"{m} {name}: seal {row['seal_ms']} ms, ntt {row['ntt_ms']} ms, hoisted {row['hoisted_ms']} ms, "
            f"same: {same}, {bool(same_hoisted)}")
        del encs, outs
    rec = {"command": " ".join([".venv/bin/python", "scripts/bench_linear_kernels.py"] + sys.argv[1:]),
           "date": sh("date", "-u", "+%F %H:%M"), "commit": sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"),
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "pinned_cpu": args.cpu},
           "n": cfg.n, "repeats": args.repeats, "rows": rows,
           "per_token_linear_s": {m: {k: round(v, 2) for k, v in d.items()} for m, d in per_model.items()},
           "wall_s": round(time.perf_counter() - t0, 1)}
    out_path.write_text(json.dumps(rec, indent=2) + "\n")
    md = ["| model | layer | d_in × d_out | ct×pt | rotations | babies / giant steps | seal ms | ntt ms | seal / ntt "
          "| ntt + hoisting ms | ntt / hoisted |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['layer']} | {r['d_in']} × {r['d_out']} | {r['ct_pt']} | {r['rotations']} | "
           f"{r['babies']} / {r['giant_steps']} | {r['seal_ms']} | {r['ntt_ms']} | {r['speedup']} | {r['hoisted_ms']} | "
           f"{r['hoisting_speedup']} |" for r in rows]
    out_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    log(f"wrote {out_path} and {out_path.with_suffix('.md')} in {rec['wall_s']} s; per token {rec['per_token_linear_s']}")


if __name__ == "__main__":
    main()
