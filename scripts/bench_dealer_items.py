#!/usr/bin/env python
"""The dealer's items and the 2PC truncation around them, per element (issue #11: at 511 context a
GPT-2 decode step's softmax asks for ~0.8 M comparisons and truncations).

Times, in this checkout (run it again in a ``git worktree`` of another commit, with
``PYTHONPATH=<worktree>``, for a side-by-side; both runs append to one --out file):

* ``random_elements``: 42 field elements (one solved-bits item's bit shares);
* the dealer's ``solved_bits`` (r, its 42 bit shares, a DCF key pair; DReLU's two-output keys) and
  ``triples``, per item, and from 2026-12-03 a truncation's item (kind "tbits", one-output keys; a
  checkout without that kind gives none);
* a truncation's online part per element (both parties in one process, the dealer's items made before
  the timer), checked against round(x / 2^12) within 1.5 ulp;
* the softmax of GPT-2's 144 attention rows at 512 keys (one decode step at 511 context, 12 layers x 12
  heads), the dealer's items made on demand inside, checked against float64 within 2e-3.

    .venv/bin/python scripts/bench_dealer_items.py --label after --out docs/bench/dealer_items.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def _commit(here: Path) -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    try:
        git = ["git", "-C", str(here)]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200_000, help="items per timed call (default 200000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each (default 3)")
    ap.add_argument("--label", default="run", help="name of this run in the JSON")
    ap.add_argument("--out", type=Path, help="JSON file to append this run to")
    a = ap.parse_args()
    if a.items < 1 or a.repeats < 1:
        sys.exit("bench_dealer_items.py: error: --items and --repeats must be >= 1")

    from cryptogen.memory import keep_freed_memory
    keep_freed_memory()  # as every CryptoGen process does
    import cryptogen
    from cryptogen.field import DEFAULT_T as T, FixedPoint, random_elements
    from cryptogen.mpc import simulate, softmax, trunc
    from cryptogen.mpc.provider import Dealer, Source

    n, times = a.items, {}

    def timed(name, fn, per):
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn()
            times.setdefault(name, []).append((time.perf_counter() - t0) / per * 1e6)

    dealer = Dealer()
    timed("random_elements_42_us", lambda: random_elements((n, 42), T), n)
    timed("dealer_solved_bits_us", lambda: dealer.solved_bits(n), n)
    timed("dealer_triples_us", lambda: dealer.triples(n), n)
    has_tbits = "tbits" in inspect.signature(Source.preprocess).parameters
    if has_tbits:
        timed("dealer_tbits_us", lambda: dealer.make("tbits", n), n)

    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 30), 1 << 30, n)

    def online_trunc(p, share):
        p.cr.preprocess(**{"tbits" if has_tbits else "bits": n})  # the kind a truncation takes here
        t0 = time.perf_counter()
        return trunc(p, share, 12), time.perf_counter() - t0
    for _ in range(a.repeats):
        (oc, tc), (os_, ts) = simulate(online_trunc, (np.mod(x - 12345, T),), (np.full(n, 12345, np.int64),))
        got = np.mod(oc + os_, T)
        got = np.where(got > T // 2, got - T, got)
        assert np.abs(got - x / 4096).max() <= 1.5, "truncation outside 1.5 ulp"
        times.setdefault("trunc_online_us", []).append(max(tc, ts) / n * 1e6)

    fp = FixedPoint()
    scores = rng.normal(0, 3, (144, 512))
    enc = fp.encode(scores)
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        oc, os_ = simulate(lambda p, s: softmax(p, s), (np.mod(enc - 7, T),), (np.full(enc.shape, 7, np.int64),))
        times.setdefault("softmax_144x512_with_dealer_s", []).append(time.perf_counter() - t0)
        err = np.abs(fp.decode(np.mod(oc + os_, T)) - want).max()
        assert err <= 2e-3, f"softmax error {err:.2e}"

    run = dict(label=a.label, commit=_commit(Path(cryptogen.__file__).resolve().parent.parent),
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=platform.processor() or
               platform.machine(), items=n, repeats=a.repeats,
               times={k: [round(v, 4) for v in vs] for k, vs in times.items()},
               median={k: round(float(np.median(vs)), 4) for k, vs in times.items()})
    print(json.dumps(run))
    if a.out:
        runs = json.loads(a.out.read_text()) if a.out.exists() else []
        runs.append(run)
        a.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
