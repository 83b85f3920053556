"""Rounds and online bytes per protocol call: the dealer's one-round DCF comparisons against
the Beaver comparison circuit (the HE provider's path), both run with an in-process dealer;
and rounds per decoded token per layer (``--layers``): a whole secure decode step in process,
with 1 and with 2 layers (the difference is one layer), for the shipped shape (4 heads, narrow
LayerNorm) and GPT-2 base's (12 heads, wide LayerNorm, 50257-token vocabulary); rounds do not
depend on the width, so the widths are small (the HE work is not what is counted).

    python scripts/report_rounds.py [--layers] [--out docs/bench/rounds.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from cryptogen.bench import _traffic
from cryptogen.field import FixedPoint
from cryptogen.mpc import gelu, layernorm, share, simulate, softmax
from cryptogen.mpc.provider import DealerProvider

CALLS = [
    ("softmax 1x128", lambda p, a: softmax(p, a), (1, 128)),
    ("softmax 1x512", lambda p, a: softmax(p, a), (1, 512)),
    ("GELU 512", lambda p, a: gelu(p, a), (512,)),
    ("GELU 3072", lambda p, a: gelu(p, a), (3072,)),
    ("LayerNorm 1x128", lambda p, a: layernorm(p, a), (1, 128)),
    ("LayerNorm 1x768 narrow", lambda p, a: layernorm(p, a, x_range=256.0), (1, 768)),
    ("LayerNorm 1x768 wide", lambda p, a: layernorm(p, a, x_range=4096.0), (1, 768)),
]


SHAPES = {  # name: (GPTConfig fields, context)
    "shipped (4 heads, vocab 4096)": (dict(vocab_size=4096, n_embd=64, n_head=4), 128),
    # the vocabulary changes only the head's argmax (2 rounds per level: 16 levels at 50257, 12 at 4096)
    "GPT-2 base (12 heads, LN range 4096)": (dict(vocab_size=4096, n_embd=96, n_head=12, secure_ln_range=4096.0), 128),
}


def layer_rounds(fields: dict, context: int, dcf: bool) -> dict:
    """Online rounds of one decoded token at ``context`` cached tokens, 1 and 2 layers."""
    import torch

    from cryptogen.driver import Driver
    from cryptogen.model import GPT, GPTConfig
    from cryptogen.plan import make_plan
    from cryptogen.scheduler.inprocess import InProcessRunner
    out = {}
    for n_layer in (1, 2):
        torch.manual_seed(0)
        cfg = GPTConfig(n_positions=context + 2, n_layer=n_layer, **fields)
        model = GPT(cfg).eval()
        plan = make_plan(n_layer, cfg.n_head, cfg.d_ff, 1)
        prompt = list(range(1, context + 1))
        runner = InProcessRunner(model, plan, prompt, provider_factory=lambda: DealerProvider(dcf=dcf))
        drv = Driver(runner, cfg, plan)
        total = lambda: _traffic([p.chan for p in runner.client_parties.values()])["rounds"]  # noqa: E731
        drv.prefill(context)
        before = total()
        drv.decode_one_token(context)
        out[n_layer] = total() - before
    return {"per_token_1_layer": out[1], "per_token_2_layers": out[2], "per_layer": out[2] - out[1],
            "head_and_embedding": 2 * out[1] - out[2]}


def _rounds_bytes(runner) -> tuple[int, int]:
    d = _traffic([p.chan for p in runner.client_parties.values()])
    return d["rounds"], d["to_server"] + d["to_client"]


def decode_timing(model_name: str, context: int, tokens: int) -> dict:
    """Seconds per decoded token of the shipped model in process (client and server threads of one
    process, one worker, an in-process dealer), DCF and circuit runs alternating token by token so
    both see the same machine load; also their online rounds and bytes per token."""
    import time as _t

    from cryptogen.driver import Driver
    from cryptogen.plan import make_plan
    from cryptogen.registry import load
    from cryptogen.scheduler.inprocess import InProcessRunner
    model = load(model_name)[0]
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, context))
    runs = {}
    for path, dcf in (("dcf", True), ("circuit", False)):
        runner = InProcessRunner(model, plan, prompt, provider_factory=lambda d=dcf: DealerProvider(dcf=d))
        drv = Driver(runner, cfg, plan)
        drv.prefill(context)
        runs[path] = (runner, drv, [], [])
    for i in range(tokens):
        for path, (runner, drv, secs, traffic) in runs.items():
            before, t0 = _rounds_bytes(runner), _t.perf_counter()
            drv.decode_one_token(context + i)
            secs.append(_t.perf_counter() - t0)
            after = _rounds_bytes(runner)
            traffic.append((after[0] - before[0], after[1] - before[1]))
            print(f"  token {i} {path}: {secs[-1]:.2f} s", flush=True)
    out = {}
    for path, (runner, drv, secs, traffic) in runs.items():
        out[path] = {"median_s": round(float(np.median(secs)), 3), "s": [round(x, 3) for x in secs],
                     "rounds_per_token": traffic[-1][0], "MiB_per_token": round(traffic[-1][1] / 2 ** 20, 2),
                     "tokens": runner.client.generated}
    out["same_tokens"] = out["dcf"]["tokens"] == out["circuit"]["tokens"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--layers", action="store_true", help="also rounds per decoded token per layer")
    ap.add_argument("--context", type=int, default=128, help="cached tokens at the decode step (--layers)")
    ap.add_argument("--no-calls", action="store_true", help="skip the per-call table")
    ap.add_argument("--paths", default="dcf,circuit", help="comparison paths for --layers (dcf, circuit)")
    ap.add_argument("--timing", metavar="MODEL", default=None,
                    help="also seconds per decoded token of this shipped model in process, DCF vs circuit")
    ap.add_argument("--tokens", type=int, default=3, help="decode tokens of --timing")
    args = ap.parse_args()
    fp, rng, rows, layers = FixedPoint(), np.random.default_rng(0), [], []
    if args.layers:
        for name, (fields, _) in SHAPES.items():
            context = args.context
            for path in args.paths.split(","):
                dcf = {"dcf": True, "circuit": False}[path]
                r = layer_rounds(fields, context, dcf)
                layers.append({"shape": name, "context": context, "path": path, **r})
                print(f"{name}, context {context}, {path}: {r['per_layer']} rounds per layer per token "
                      f"({r['per_token_2_layers']} with 2 layers)", flush=True)
    for name, fn, shape in ([] if args.no_calls else CALLS):
        x = rng.normal(0, 1, shape)
        row = {"call": name}
        for path, dcf in (("dcf", True), ("circuit", False)):
            st = {}
            xc, xs = share(fp.encode(x))
            simulate(fn, (xc,), (xs,), provider=DealerProvider(dcf=dcf), stats=st)
            online = st["client"]["channel"]["online"]
            row[path] = {"rounds": online["rounds"], "sent_KiB": round(online["bytes_sent"] / 1024, 1)}
        rows.append(row)
        print(f"{name:24s} circuit {row['circuit']['rounds']:4d} rounds {row['circuit']['sent_KiB']:9.1f} KiB"
              f" | dcf {row['dcf']['rounds']:3d} rounds {row['dcf']['sent_KiB']:7.1f} KiB", flush=True)
    timing = None
    if args.timing:
        timing = decode_timing(args.timing, args.context, args.tokens)
        print(json.dumps({k: v for k, v in timing.items() if k != "same_tokens"}), flush=True)
    if args.out:
        meta = {"command": "python scripts/report_rounds.py " + " ".join(__import__("sys").argv[1:]),
                "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.node()}"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "layers": layers, "timing": timing}, f, indent=1)


if __name__ == "__main__":
    main()
