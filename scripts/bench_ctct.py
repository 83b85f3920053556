#!/usr/bin/env python
"""The attention's ciphertext products over the encrypted KV cache, SEAL's against ours (he/ctct.py),
side by side in one run (issue #11).

For C cache ciphertexts (a head group's cache at C * tokens-per-ciphertext context) one decode step's
server products: q.K (``mul_ct_ct_many``: C products, each relinearised) and p.V (``dot_ct_ct``: C
products summed, not relinearised), with SEAL's multiply and with ctct. Before each step the last K
and V ciphertexts are replaced (a decode append writes the newest token into them), so ctct
re-prepares those and reuses the others' kept preparation, as in a decode. Alternating, median of
--repeats after one warm-up; the two paths' outputs are checked to decrypt alike. Writes JSON and a
Markdown table.

    .venv/bin/python scripts/bench_ctct.py [--contexts 1,2,4,8,16] [--repeats 5] \
        [--out docs/bench/ctct.json]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse, json, platform, subprocess, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors
        sys.exit(f"bench_ctct.py: error: {message}")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,8, got {text!r}")
    if not out or min(out) < 1 or max(out) > 64:
        raise argparse.ArgumentTypeError("cache ciphertext counts must be 1..64")
    return out


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=_ints, default=[1, 2, 4, 8, 16], help="cache ciphertexts per head group")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (a .md table is written beside it)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import numpy as np
    from cryptogen.he import ClientKeys, HEConfig, ServerEngine, ctct
    from cryptogen.he.engine import Cipher

    if not ctct.available():
        sys.exit("bench_ctct.py: error: the compiled kernels are missing; run bin/bootstrap")
    cfg = HEConfig()
    keys = ClientKeys.generate(cfg)
    e = ServerEngine(keys.public_context())
    rng = np.random.default_rng(0)
    enc = lambda: Cipher(keys.encrypt(rng.integers(0, 1 << 20, cfg.n)), e.noise.fresh_encryption)  # noqa: E731
    real_available = ctct.available
    rows = []
    for C in args.contexts:
        ks, vs, q, ps = [enc() for _ in range(C)], [enc() for _ in range(C)], enc(), [enc() for _ in range(C)]
        times = {"seal": {"qk": [], "pv": []}, "ctct": {"qk": [], "pv": []}}
        outs = {}
        for rep in range(args.repeats + 1):
            ks[-1] = Cipher(ks[-1].ct + ks[-1].ct, ks[-1].budget)  # the newest token's write
            vs[-1] = Cipher(vs[-1].ct + vs[-1].ct, vs[-1].budget)
            for mode in ("seal", "ctct"):
                ctct.available = real_available if mode == "ctct" else (lambda: False)
                if mode == "ctct":
                    ks[-1].prepared = vs[-1].prepared = None  # as new to ctct as to SEAL
                t0 = time.perf_counter()
                qk = e.mul_ct_ct_many(q, ks)
                t1 = time.perf_counter()
                pv = e.dot_ct_ct(ps, vs)
                t2 = time.perf_counter()
                if rep:
                    times[mode]["qk"].append(t1 - t0)
                    times[mode]["pv"].append(t2 - t1)
                outs[mode] = (qk, pv)
            ctct.available = real_available
            same = all(np.array_equal(keys.decrypt(a.ct), keys.decrypt(b.ct))
                       for a, b in zip(outs["seal"][0] + [outs["seal"][1]], outs["ctct"][0] + [outs["ctct"][1]]))
            if not same:
                sys.exit(f"bench_ctct.py: error: the two paths decrypt differently at C={C}")
        med = {m: {k: float(np.median(v)) * 1e3 for k, v in d.items()} for m, d in times.items()}
        row = {"cache_cts": C, **{f"{m}_{k}_ms": round(v, 2) for m, d in med.items() for k, v in d.items()}}
        row["speedup"] = round((med["seal"]["qk"] + med["seal"]["pv"]) / (med["ctct"]["qk"] + med["ctct"]["pv"]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"what": "one decode step's q.K (relinearised) and p.V (summed) products per head group, ms",
              "n": cfg.n, "data_primes": len(cfg.qi_sizes) - 1, "repeats": args.repeats, "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        lines = ["| cache cts | SEAL q.K | ctct q.K | SEAL p.V | ctct p.V | speed-up |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['cache_cts']} | {r['seal_qk_ms']} | {r['ctct_qk_ms']} | {r['seal_pv_ms']} | {r['ctct_pv_ms']} "
                  f"| {r['speedup']}x |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
