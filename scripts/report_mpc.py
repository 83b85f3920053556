#!/usr/bin/env python
"""Accuracy and cost report of the 2PC nonlinear protocols (cryptogen.mpc).

Prints a table and writes JSON (default docs/bench/mpc.json):
  * accuracy: max / mean absolute error of softmax, GELU, LayerNorm against torch float64 on
    realistic synthetic activations (GPT-2-base-like ranges) and, with --activations, on real
    ones from an .npz with keys ``ln_in`` (rows, d), ``scores`` (..., n; non-finite = masked),
    ``gelu_in`` (any shape); optional ``ln_gamma``, ``ln_beta``;
  * cost per call: rounds, online bytes sent per party, triples and solved bits consumed,
    offline traffic and wall time, for softmax over 512 / GELU over 3072 / LayerNorm over 768
    (GPT-2 base) and 128 / 512 / 128 (the small model), with the dealer and the HE provider.
Usage: python scripts/report_mpc.py [--activations acts.npz] [--out docs/bench/mpc.json] [--no-he]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from cryptogen.field import FixedPoint
from cryptogen.mpc import DealerProvider, gelu, layernorm, reconstruct, share, simulate, softmax
from cryptogen.mpc.provider import nbits

FP = FixedPoint()
ELT = 6  # bytes per field element on the wire (42-bit elements packed in 6 bytes)


def ref_softmax(x, valid):
    t = torch.tensor(x).masked_fill(~torch.tensor(valid), float("-inf"))
    return torch.softmax(t, -1).numpy()


def ref_gelu(x):
    return torch.nn.functional.gelu(torch.tensor(x), approximate="tanh").numpy()


def ref_ln(x, g, b):
    return torch.nn.functional.layer_norm(torch.tensor(x), (x.shape[-1],), torch.tensor(g),
                                          torch.tensor(b), 1e-5).numpy()


# ------------------------------------------------------------------------------------------
def run(fn, x, provider, server_extra=()):
    xc, xs = share(FP.encode(x))
    st = {}
    t0 = time.perf_counter()
    c, s = simulate(fn, (xc,), (xs, *server_extra), provider=provider, stats=st)
    dt = time.perf_counter() - t0
    return FP.decode(reconstruct(c, s)), st, dt


def softmax_call(x, valid):
    return lambda p, a: softmax(p, a, mask=valid)


def ln_call(p, a, g=None, b=None):
    return layernorm(p, a, g, b)


def make_provider(name):
    if name == "dealer":
        return DealerProvider()
    from cryptogen.mpc.provider_he import HEProvider
    return HEProvider()


# ------------------------------------------------------------------------------------------
def synthetic(rng):
    """GPT-2-base-like activations (see docs/MPC.md for the choice)."""
    ln = []
    for d, sig in ((768, 0.15), (768, 1.0), (768, 8.0), (128, 1.0), (128, 4.0)):
        x = rng.normal(rng.normal(0, 0.3), sig, (4, d))
        x[:, rng.choice(d, 3, replace=False)] += rng.choice([-1, 1], 3) * 25 * sig  # outlier dims
        ln.append((f"d={d} sigma={sig} +outliers", np.clip(x, -250, 250)))
    scores = []
    for n, sig in ((512, 3.0), (512, 10.0), (128, 3.0)):
        x = np.clip(rng.normal(0, sig, (4, n)), -30, 30)
        scores.append((f"1x{n} N(0,{sig}) clip 30", x, np.ones_like(x, bool)))
    x = np.clip(rng.normal(0, 4, (64, 64)), -30, 30)
    scores.append(("64x64 causal prefill N(0,4)", x, np.tril(np.ones((64, 64), bool))))
    g1 = np.concatenate([rng.normal(-0.6, 1.6, 6000), rng.uniform(-10, 10, 2000)])
    gelu_sets = [("N(-0.6,1.6) + U(-10,10)", g1)]
    return ln, scores, gelu_sets


def from_npz(path, rng):
    z = np.load(path)
    ln, scores, gl = [], [], []
    if "ln_in" in z:
        x = z["ln_in"].reshape(-1, z["ln_in"].shape[-1]).astype(np.float64)
        x = x[rng.choice(len(x), min(16, len(x)), replace=False)]
        ln.append((f"npz ln_in d={x.shape[-1]}", x))
    if "scores" in z:
        s = z["scores"].reshape(-1, z["scores"].shape[-1]).astype(np.float64)
        s = s[rng.choice(len(s), min(32, len(s)), replace=False)]
        valid = np.isfinite(s) & (s > -1e4)  # -inf or finfo.min-style masking
        scores.append((f"npz scores n={s.shape[-1]}", np.where(valid, s, 0.0), valid))
    if "gelu_in" in z:
        g = z["gelu_in"].ravel().astype(np.float64)
        gl.append(("npz gelu_in", g[rng.choice(len(g), min(20000, len(g)), replace=False)]))
    affine = (z["ln_gamma"], z["ln_beta"]) if "ln_gamma" in z else None
    return ln, scores, gl, affine


def accuracy(rng, ln_sets, score_sets, gelu_sets, affine=None):
    rows = []
    for name, x in ln_sets:
        d = x.shape[-1]
        g, b = affine if affine is not None and len(affine[0]) == d else (rng.normal(1, 0.2, d),
                                                                          rng.normal(0, 0.1, d))
        y, _, _ = run(ln_call, x, DealerProvider(), (g, b))
        rows.append(_err("layernorm", name, y, ref_ln(x, g, b)))
    for name, x, valid in score_sets:
        y, _, _ = run(softmax_call(x, valid), x, DealerProvider())
        rows.append(_err("softmax", name, y, ref_softmax(x, valid)))
    for name, x in gelu_sets:
        y, _, _ = run(gelu, x, DealerProvider())
        rows.append(_err("gelu", name, y, ref_gelu(x)))
    return rows


def _err(fn, name, y, ref):
    e = np.abs(y - ref)
    return dict(function=fn, inputs=name, n=int(e.size), max_abs_err=float(e.max()),
                mean_abs_err=float(e.mean()))


# ------------------------------------------------------------------------------------------
COST_CASES = [("softmax", 512, "gpt2-base"), ("gelu", 3072, "gpt2-base"), ("layernorm", 768, "gpt2-base"),
              ("softmax", 128, "small"), ("gelu", 512, "small"), ("layernorm", 128, "small")]


def cost(rng, providers):
    rows = []
    L = nbits(FP.t)
    for prov in providers:
        for fn, n, model in COST_CASES:
            if fn == "softmax":
                x = np.clip(rng.normal(0, 3, (1, n)), -30, 30)
                call, ref, extra = softmax_call(x, np.ones_like(x, bool)), ref_softmax(x, np.ones_like(x, bool)), ()
            elif fn == "gelu":
                x = rng.normal(-0.6, 1.6, n)
                call, ref, extra = gelu, ref_gelu(x), ()
            else:
                x = rng.normal(0, 1.0, (1, n))
                g, b = rng.normal(1, 0.2, n), rng.normal(0, 0.1, n)
                call, ref, extra = ln_call, ref_ln(x, g, b), (g, b)
            y, st, dt = run(call, x, make_provider(prov), extra)
            on = st["client"]["channel"]["online"]
            off = st["client"]["channel"].get("offline", {})
            off_s = st["server"]["channel"].get("offline", {})
            used = st["client"]["randomness"]["consumed"]
            made = st["client"]["randomness"]["produced"]
            nt, nb = used.get("triple", 0), used.get("bits", 0)
            if prov == "dealer":  # dealer -> each party: 3 elements per triple, L+1 per solved-bits item
                offline = dict(dealer_to_each_party_bytes=ELT * (3 * nt + (L + 1) * nb))
            else:
                offline = dict(client_sent_bytes=off.get("bytes_sent", 0),
                               server_sent_bytes=off_s.get("bytes_sent", 0),
                               rounds=off.get("rounds", 0), triples_produced=made.get("triple", 0),
                               bits_produced=made.get("bits", 0),
                               triples_consumed_making_bits=st["client"]["randomness"]
                               .get("consumed_offline", {}).get("triple", 0),
                               note="includes generating the solved bits and one public-key transfer")
            rows.append(dict(function=fn, size=n, model=model, provider=st["provider"],
                             rounds=on["rounds"], online_bytes_sent_per_party=on["bytes_sent"],
                             triples=nt, solved_bits=nb, offline=offline, wall_seconds=round(dt, 3),
                             max_abs_err=float(np.abs(y - ref).max())))
            print(f"  {prov:6s} {fn:9s} {n:5d}: {on['rounds']} rounds, "
                  f"{on['bytes_sent'] / 2**20:.2f} MiB/party online, {dt:.1f} s", flush=True)
    return rows


def table(acc, cst):
    lines = ["", "Accuracy vs torch float64 (dealer provider; the HE provider computes the same values)",
             f"{'function':10s} {'inputs':36s} {'n':>7s} {'max abs':>10s} {'mean abs':>10s}"]
    for r in acc:
        lines.append(f"{r['function']:10s} {r['inputs']:36s} {r['n']:7d} {r['max_abs_err']:10.2e} "
                     f"{r['mean_abs_err']:10.2e}")
    lines += ["", "Cost per call (online: per party sent; both parties send the same amount)",
              f"{'provider':8s} {'function':10s} {'size':>5s} {'rounds':>6s} {'online MiB':>10s} "
              f"{'triples':>9s} {'bits':>6s} {'offline MiB':>11s} {'sec':>6s}"]
    for r in cst:
        off = r["offline"]
        ob = off.get("dealer_to_each_party_bytes", off.get("client_sent_bytes", 0) + off.get("server_sent_bytes", 0))
        lines.append(f"{r['provider']:8s} {r['function']:10s} {r['size']:5d} {r['rounds']:6d} "
                     f"{r['online_bytes_sent_per_party'] / 2**20:10.2f} {r['triples']:9d} {r['solved_bits']:6d} "
                     f"{ob / 2**20:11.1f} {r['wall_seconds']:6.1f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", help=".npz with ln_in / scores / gelu_in")
    ap.add_argument("--out", default="docs/bench/mpc.json")
    ap.add_argument("--no-he", action="store_true", help="skip the HE provider cost runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    ln, sc, gl = synthetic(rng)
    affine = None
    if args.activations:
        ln2, sc2, gl2, affine = from_npz(args.activations, rng)
        ln, sc, gl = ln + ln2, sc + sc2, gl + gl2
    print("accuracy ...", flush=True)
    acc = accuracy(rng, ln, sc, gl, affine)
    print("cost ...", flush=True)
    cst = cost(rng, ["dealer"] + ([] if args.no_he else ["he"]))
    print(table(acc, cst))
    meta = dict(command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}",
                python=platform.python_version(), numpy=np.__version__, torch=torch.__version__,
                t=FP.t, frac_bits=FP.frac_bits, activations=args.activations)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, accuracy=acc, cost=cst), fh, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
