"""DCF key generation and evaluation time (cryptogen/mpc/dcf.py) per batch size, optionally side by
side with another version of the module (same inputs, interleaved repeats, minimum of each):

    git show 0f4b7d5:cryptogen/mpc/dcf.py > /tmp/dcf_0f4b7d5.py
    .venv/bin/python scripts/bench_dcf.py --against /tmp/dcf_0f4b7d5.py --out docs/bench/dcf.json
    git show 5f69e1d:cryptogen/mpc/dcf.py > /tmp/dcf_numpy_5f69e1d.py  # numpy only, before the C kernel
    .venv/bin/python scripts/bench_dcf.py --against /tmp/dcf_numpy_5f69e1d.py --repeats 15 --out docs/bench/dcf_kernel.json

Batch sizes: what one secure decode step of the shipped WikiText-2 model asks for (evaluations of
1 to 1536 items, 129 calls per party; key generation in pools of 1024). With ``--against`` the
shares of both versions are checked equal on the same keys.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptogen.field import DEFAULT_T  # noqa: E402
from cryptogen.mpc import dcf  # noqa: E402

L = 42


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("cryptogen.mpc._dcf_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,32,145,512,1024,4096", help="batch sizes (items per call)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per size (evaluation; generation a third)")
    ap.add_argument("--against", type=Path, help="another dcf.py to time side by side")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        sys.exit(f"error: --sizes must be integers separated by commas, got {a.sizes!r}")
    if a.against and not a.against.is_file():
        sys.exit(f"error: no file at {a.against} (make it with git show REV:cryptogen/mpc/dcf.py > FILE)")
    other = _load(a.against) if a.against else None
    rng, t, rows = np.random.default_rng(0), DEFAULT_T, []
    print("| items | eval ms | gen ms |" + (" other eval ms | other gen ms | eval ratio | gen ratio |" if other else ""))
    print("|---:|---:|---:|" + ("---:|---:|---:|---:|" if other else ""))
    for n in sizes:
        alpha, x = rng.integers(0, t, (2, n))
        beta = rng.integers(0, t, (n, dcf.OUT))
        k0, k1 = dcf.gen(alpha, beta, L, t)
        want = np.where((x < alpha)[:, None], beta, 0)
        if not np.array_equal(np.mod(dcf.eval_(0, k0, x, L, t) + dcf.eval_(1, k1, x, L, t), t), want):
            sys.exit(f"error: the DCF is wrong at {n} items")
        row = {"items": n,
               "eval_ms": _best(lambda: dcf.eval_(0, k0, x, L, t), a.repeats),
               "gen_ms": _best(lambda: dcf.gen(alpha, beta, L, t), max(3, a.repeats // 3))}
        line = f"| {n} | {row['eval_ms']:.2f} | {row['gen_ms']:.1f} |"
        if other:
            for b, k in ((0, k0), (1, k1)):
                if not np.array_equal(other.eval_(b, k, x, L, t), dcf.eval_(b, k, x, L, t)):
                    sys.exit(f"error: the two versions' shares differ at {n} items")
            row["other_eval_ms"] = _best(lambda: other.eval_(0, k0, x, L, t), a.repeats)
            row["other_gen_ms"] = _best(lambda: other.gen(alpha, beta, L, t), max(3, a.repeats // 3))
            line += (f" {row['other_eval_ms']:.2f} | {row['other_gen_ms']:.1f} |"
                     f" {row['other_eval_ms'] / row['eval_ms']:.2f}x | {row['other_gen_ms'] / row['gen_ms']:.2f}x |")
        print(line, flush=True)
        rows.append(row)
    if a.out:
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": platform.machine(),
                                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "against": str(a.against) if a.against else None, "L": L, "t": t,
                                     "rows": rows}, indent=1) + "\n")
        print(f"[wrote {a.out}]")


if __name__ == "__main__":
    main()
