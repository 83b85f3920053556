"""What the ciphertext wire forms (cryptogen/he/wire.py) cost and save per decoded token, side by side.

Two in-process sessions of the same model and prompt (client and server threads of one process, one
worker, an in-process dealer): one with the wire forms (seeded uploads, switched downloads, 54-bit
packing), one with SEAL's raw bytes as before (public-key uploads, full-modulus downloads, 64-bit
words). Tokens alternate between the two, so both see the same machine load; the raw form is
restored only around the baseline's steps. Reports seconds, online rounds and client<->server MiB per
token, and the wire operations' own costs (median of 20, this machine, this run).

    nice -n 5 .venv/bin/python scripts/bench_wire.py --model wikitext2 --context 16 --tokens 4 \
        --out docs/bench/wire.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def raw_seal_bytes():
    """The pre-wire-forms transport: public-key encryption, SEAL's own bytes both ways."""
    from Pyfhel import PyCtxt

    from cryptogen.he import keys, serialize

    def to_bytes(self, ct, form="packed"):
        return serialize.pack("ciphertext", self.config.fingerprint, self.key_id, {}, ct.to_bytes("none"))

    def from_bytes(self, data):
        _, payload, _, _ = serialize.unpack(data, "ciphertext", self.config.fingerprint, self.key_id)
        return PyCtxt(pyfhel=self.he, bytestring=payload)

    def encrypt_to_bytes(self, slots):
        return to_bytes(self, self.encrypt_public(slots))

    saved = (keys._HEBase.ct_to_bytes, keys._HEBase.ct_from_bytes, keys.ClientKeys.encrypt_to_bytes)
    keys._HEBase.ct_to_bytes, keys._HEBase.ct_from_bytes = to_bytes, from_bytes
    keys.ClientKeys.encrypt_to_bytes = encrypt_to_bytes
    try:
        yield
    finally:
        keys._HEBase.ct_to_bytes, keys._HEBase.ct_from_bytes, keys.ClientKeys.encrypt_to_bytes = saved


def op_costs() -> dict:
    """Milliseconds per operation, each form against the raw one (N = 16384, the default HEConfig)."""
    from cryptogen.he import ClientKeys, HEConfig, ServerEngine
    cfg = HEConfig()
    k = ClientKeys.generate(cfg)
    ctx = k.public_context()
    eng = ServerEngine(ctx)
    m = np.random.default_rng(0).integers(0, cfg.t, cfg.n)

    def ms(f, reps=20):
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return round(float(np.median(times)) * 1e3, 2)

    c = eng.encrypt(m)
    out = {}
    for name in ("wire", "raw"):
        with (contextlib.nullcontext() if name == "wire" else raw_seal_bytes()):
            up = k.encrypt_to_bytes(m)
            down = ctx.ct_to_bytes(c.ct, "switched")
            out[name] = {"client_upload_ms": ms(lambda: k.encrypt_to_bytes(m)),
                         "server_receive_ms": ms(lambda: ctx.ct_from_bytes(up)),
                         "server_serialise_download_ms": ms(lambda: ctx.ct_to_bytes(c.ct, "switched")),
                         "client_receive_decrypt_ms": ms(lambda: k.decrypt(k.ct_from_bytes(down))),
                         "upload_bytes": len(up), "download_bytes": len(down)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wikitext2")
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.context < 1 or args.tokens < 1:
        ap.error("--context and --tokens must be >= 1")
    from report_rounds import _rounds_bytes

    from cryptogen.driver import Driver
    from cryptogen.mpc.provider import DealerProvider
    from cryptogen.plan import make_plan
    from cryptogen.registry import load
    from cryptogen.scheduler.inprocess import InProcessRunner
    t_start = time.time()
    ops = op_costs()
    print(json.dumps(ops), flush=True)
    model = load(args.model)[0]
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    prompt = list(np.random.default_rng(0).integers(0, cfg.vocab_size, args.context))
    runs = {}
    for name in ("wire", "raw"):
        with (contextlib.nullcontext() if name == "wire" else raw_seal_bytes()):
            print(f"[bench_wire] {name}: prefill of {args.context} tokens", flush=True)
            runner = InProcessRunner(model, plan, prompt, provider_factory=DealerProvider)
            drv = Driver(runner, cfg, plan)
            drv.prefill(args.context)
            runs[name] = (runner, drv, [], [])
    for i in range(args.tokens):
        for name, (runner, drv, secs, traffic) in runs.items():
            with (contextlib.nullcontext() if name == "wire" else raw_seal_bytes()):
                before, t0 = _rounds_bytes(runner), time.perf_counter()
                drv.decode_one_token(args.context + i)
                secs.append(time.perf_counter() - t0)
                after = _rounds_bytes(runner)
            traffic.append((after[0] - before[0], after[1] - before[1]))
            print(f"  token {i} {name}: {secs[-1]:.2f} s, {traffic[-1][1] / 2 ** 20:.1f} MiB", flush=True)
    out = {"meta": {"command": "python " + " ".join(sys.argv), "date": str(date.today()),
                    "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared), load average "
                               f"{os.getloadavg()[0]:.1f} at the end", "model": args.model, "context": args.context,
                    "wall_minutes": round((time.time() - t_start) / 60, 1)},
           "op_costs": ops}
    for name, (runner, _drv, secs, traffic) in runs.items():
        out[name] = {"median_s": round(float(np.median(secs)), 3), "s": [round(x, 3) for x in secs],
                     "rounds_per_token": traffic[-1][0], "MiB_per_token": round(traffic[-1][1] / 2 ** 20, 2),
                     "tokens": runner.client.generated}
    out["same_tokens"] = out["wire"]["tokens"] == out["raw"]["tokens"]
    out["time_ratio_wire_over_raw"] = round(out["wire"]["median_s"] / out["raw"]["median_s"], 3)
    print(json.dumps({k: v for k, v in out.items() if k not in ("op_costs",)}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
