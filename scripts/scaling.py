"""A scaling model of the secure decode step over many workers, checked against measured runs (#12).

    python scripts/scaling.py measure [--workers 1,2,4] [--context 16] [--tokens 3] [--out docs/bench/scaling_runs.json]
    python scripts/scaling.py model [--runs docs/bench/scaling_runs.json] [--out docs/bench/scaling.json]

``measure``: per worker count, a local ``cryptogen serve`` (its own process, embedded Ray declaring
``max(2, w)`` CPUs so that w workers can be placed on this 2-core machine) and this process as its
client over TLS (the ``cryptogen bench`` Ray backend: per-party CPU seconds from /proc, rounds and bytes
from the client's counters). With ``--cluster``, one more run of the largest count whose server joins a
``ray.cluster_utils.Cluster`` (2 nodes of ``w/2`` CPUs): its workers are not the server's children, so
only its latency is recorded.

``model``: per decoded token, from the 1-worker run only (its fitted overlap factor alpha):

    t(w) = max( alpha * (W / min(w, P) + C + G),  (W * (1 + o(w)) + C + G + Y) / cores ) + R * rtt + B / bw

W: the workers' CPU seconds (they split over workers, at most P = heads-per-layer ways), C: the client's
(with ``--provider dealer`` the in-process dealer's too), times 1 + oc (w - 1) (one 2PC party per
worker), G: the gateway's, Y: Ray's own; o, oc: the extra worker / client CPU sharding adds (measured
at 2 workers, assumed linear in w - 1); alpha: how much client and server work overlap (t(1) over the CPU sum). The first
term is the critical path, the second the CPU bound of ``cores`` cores; rounds R and bytes B pay the
link (rtt, bw) serially (the conservative end; ``scripts/bench_network.py`` measured the overlap).
Predictions for 2 and 4 workers are compared with the measured ones. The GPT-2 base projection
scales W and C from the GPT-2-width one-layer run's counts (docs/bench/gpt2_width_1layer_wire.json) and
the measured per-op costs (docs/bench/he_floor.json), for 1..64 workers on this machine's cores, on
64 cores, and on the LAN/WAN profiles of issue #12.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROFILES = {"loopback": (0.0, float("inf")), "lan": (0.0005, 1e9), "wan": (0.04, 1e8)}  # (rtt s, bits/s)


def log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


# ---- measure --------------------------------------------------------------------------------------
def _backend(folder: str, w: int, address: str | None, dealer):
    """The bench's Ray backend, declaring enough (virtual) CPUs for w workers on a single node."""
    from cryptogen.bench_ray import RayBackend
    return RayBackend(folder, w, address, extra=[] if address else ["--num-cpus", str(max(2, w))], dealer=dealer)


def measure(args) -> None:
    import numpy as np

    from cryptogen.registry import resolve_model
    folder = str(resolve_model(args.model).resolve())
    cfg = json.loads((Path(folder) / "config.json").read_text())
    prompt = np.random.default_rng(0).integers(0, cfg["vocab_size"], args.context + 1).tolist()
    runs, dealer = [], None
    if args.provider == "dealer":  # a dealer in this process (its CPU counts as the client's)
        import tempfile

        from cryptogen.dealer.service import DealerServer
        tmp = tempfile.mkdtemp(prefix="cryptogen-scaling-dealer-")
        dealer = DealerServer(listen="127.0.0.1:0", state_dir=tmp, out_dir=tmp).start()
    plan = [(w, None) for w in args.workers] + ([(max(args.workers), "cluster")] if args.cluster else [])
    for w, kind in plan:
        cluster, t0 = None, time.monotonic()
        if kind == "cluster":
            from ray.cluster_utils import Cluster
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(2):
                cluster.add_node(num_cpus=max(1, w // 2))
            cluster.wait_for_nodes()
        log(f"{w} worker(s){' on a 2-node Cluster' if cluster else ''}: starting")
        b = _backend(folder, w, cluster.address if cluster else None, dealer)
        try:
            r = b.run("kv-reuse", prompt, args.tokens, lambda t: log(f"  {t.phase} @{t.position} {t.seconds:.2f} s"))
        finally:
            b.close()
            if cluster:
                cluster.shutdown()
        runs.append({"workers": w, "cluster": bool(cluster), **r, "wall_s": time.monotonic() - t0})
        log(f"{w} worker(s): median decode {r['median_decode_s']:.2f} s, cpu/token {r.get('cpu_s_per_token')}")
    out = {"command": "python scripts/scaling.py measure " + " ".join(sys.argv[2:]), "date": date.today().isoformat(),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus", "load_average_end": os.getloadavg()[0],
           "model": args.model, "provider": args.provider, "config": cfg, "context": args.context, "tokens": args.tokens, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if dealer:
        dealer.stop()
    log(f"wrote {args.out}")


# ---- model ----------------------------------------------------------------------------------------
def predict(p: dict, w: int, cores: float, rtt: float = 0.0, bw: float = float("inf")) -> dict:
    """Seconds per decoded token for ``w`` workers (see the module docstring), with its two bounds."""
    W, G, Y = p["W"], p["G"], p["Y"]
    C = p["C"] * (1 + p.get("oc", 0.0) * (w - 1))  # the client runs one party per worker
    path = p["alpha"] * (W / min(w, p["P"]) + C + G)
    cpu = (W * (1 + p["o"] * (w - 1)) + C + G + Y) / cores
    link = p["R"] * rtt + 8 * p["B"] / bw
    return {"s": max(path, cpu) + link, "path": path, "cpu": cpu, "link": link,
            "bound": "link" if link > max(path, cpu) else ("cpu" if cpu >= path else
                                                          ("client" if C + G > W / min(w, p["P"]) else "workers"))}


def _params(run: dict, heads: int, o: float = 0.0) -> dict:
    cpu = run["cpu_s_per_token"]
    W, C, G, Y = cpu.get("workers", 0.0), cpu.get("client", 0.0), cpu.get("gateway", 0.0), cpu.get("ray", 0.0)
    return {"W": W, "C": C, "G": G, "Y": Y, "P": heads, "o": o, "R": run["rounds_per_token"],
            "B": run["bytes_per_token"]["total"], "alpha": min(1.0, run["median_decode_s"] / (W + C + G))}


def model(args) -> None:
    data = json.loads(Path(args.runs).read_text())
    heads, cores = data["config"]["n_head"], os.cpu_count() or 2
    runs = {(r["workers"], r["cluster"]): r for r in data["runs"]}
    one = runs[(1, False)]
    two = runs.get((2, False))
    o = 0.0 if two is None else max(0.0, two["cpu_s_per_token"]["workers"] / one["cpu_s_per_token"]["workers"] - 1)
    oc = 0.0 if two is None else max(0.0, two["cpu_s_per_token"]["client"] / one["cpu_s_per_token"]["client"] - 1)
    p = _params(one, heads, o)
    p["oc"] = oc
    check = []
    for (w, cl), r in sorted(runs.items()):
        pr = predict(p, w, cores)
        # the same latency model fed this run's own CPU seconds (tells the latency structure's error
        # from the CPU-growth model's); a Cluster run's workers are not the server's children: none
        own, cpu = None, r["cpu_s_per_token"]
        if cpu.get("workers"):
            W, CG = cpu["workers"], cpu["client"] + cpu["gateway"]
            own = max(p["alpha"] * (W / min(w, heads) + CG), (W + CG + cpu["ray"]) / cores)
        check.append({"workers": w, "cluster": cl, "measured_s": r["median_decode_s"], "predicted_s": pr["s"],
                      "error": pr["s"] / r["median_decode_s"] - 1, "bound": pr["bound"],
                      "predicted_with_measured_cpu_s": own,
                      "error_with_measured_cpu": None if own is None else own / r["median_decode_s"] - 1})
    g, g_notes = gpt2_base_inputs(p, one)
    if args.client_growth is not None:  # the client's extra CPU per added worker, for the projection only
        g["oc"] = args.client_growth
        g_notes = g_notes + [f"client CPU growth per added worker set to {args.client_growth} (--client-growth; "
                             f"fitted on the runs: {oc:.3f})"]
    ws = [1, 2, 4, 8, 12, 16, 32, 64]
    proj = {prof: {str(c): [dict(workers=w, **predict(g, w, c, *PROFILES[prof])) for w in ws] for c in (cores, 64)}
            for prof in PROFILES}
    out = {"command": "python scripts/scaling.py model " + " ".join(sys.argv[2:]), "date": date.today().isoformat(),
           "runs": args.runs, "fitted": p, "check": check, "gpt2_base_inputs": g,
           "assumptions": g_notes,
           "gpt2_base_projection": proj}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    _plot(proj, Path(args.out).with_suffix(".png"), cores)
    for c in check:
        own = "" if c["predicted_with_measured_cpu_s"] is None else \
            f"; with its measured CPU {c['predicted_with_measured_cpu_s']:.2f} s ({100 * c['error_with_measured_cpu']:+.0f} %)"
        print(f"{c['workers']} worker(s){' (Cluster)' if c['cluster'] else ''}: measured {c['measured_s']:.2f} s, "
              f"predicted {c['predicted_s']:.2f} s ({100 * c['error']:+.0f} %), bound: {c['bound']}{own}")
    for prof in PROFILES:
        row = proj[prof]["64"]
        print(f"GPT-2 base, 64 cores, {prof}: " + ", ".join(f"{r['workers']}w {r['s']:.0f} s ({r['bound']})" for r in row))
    log(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def gpt2_base_inputs(p: dict, one: dict) -> tuple[dict, list[str]]:
    """W, C, rounds and bytes per decoded token of GPT-2 base (12 layers) on one worker: the one-layer
    GPT-2-width run minus its vocabulary part (the embedding's and LM head's ct×pt and rotations from
    their public plans, their ciphertexts in bytes), times 12 layers, plus the vocabulary part."""
    from cryptogen.he.params import HEConfig
    from cryptogen.model import GPTConfig
    from cryptogen.secure_plan import embed_plan, embed_shards, head_plan
    g1 = json.loads((ROOT / "docs/bench/gpt2_width_1layer_wire.json").read_text())["contexts"][0]["kv-reuse"]
    fl = json.loads((ROOT / "docs/bench/he_floor.json").read_text())
    cfg, n = GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12), HEConfig().n
    shards, ep, hp = len(embed_shards(cfg)), embed_plan(cfg, n), head_plan(cfg, n)
    vocab = {"ct_pt_mul": shards * ep.decode_ct_pt + hp.decode_ct_pt,
             "rotations": shards * ep.decode_rotations() + hp.decode_rotations()}
    # a ciphertext on the wire (cryptogen/he/wire.py): seeded up, switched down; the two differ by 0.03 %
    from cryptogen.he import wire
    ct_bytes = wire.PREFIX + wire.SEED_BYTES + sum(wire.packed_len(n, b) for b in HEConfig().qi_sizes[:-1])
    vocab_bytes = (2 * shards * ep.decode_outputs + 1 + hp.decode_outputs) * ct_bytes  # one-hots up, H2S down
    ops = g1["he_ops_per_token"]
    layer = {k: ops[k] - vocab[k] for k in vocab}
    layer_bytes = g1["bytes_per_token"]["total"] - vocab_bytes
    # rounds per layer and for the head, measured at GPT-2 base's head count and LayerNorm range
    # (scripts/report_rounds.py --layers; width-independent); the argmax over 50257 has 4 more
    # comparison levels (2 rounds each with the dealer's DCF keys) than over 4096
    rr = json.loads((ROOT / "docs/bench/rounds.json").read_text())["layers"]
    row = next(r for r in rr if r["shape"].startswith("GPT-2") and r["path"] == "dcf")
    # only the softmax depends on the context: its max tree has ceil(log2 n) levels of 2 rounds
    levels = lambda n: (n - 1).bit_length()  # noqa: E731
    layer_rounds = row["per_layer"] + 2 * (levels(128 + 1) - levels(row["context"] + 1))
    # the vocabulary's part (embedding shards, LM head, argmax over 50257): the one-layer GPT-2-width
    # run (context 16) minus its layer
    head_rounds = g1["rounds_per_token"] - (row["per_layer"] + 2 * (levels(16 + 1) - levels(row["context"] + 1)))
    R = head_rounds + 12 * layer_rounds
    B = g1["bytes_per_token"]["total"] + 11 * layer_bytes
    unit = {"ct_pt": _unit(fl, "ct_pt"), "rotation": _unit(fl, "rotation")}
    he = lambda o: o["ct_pt_mul"] * unit["ct_pt"] + o["rotations"] * unit["rotation"]  # noqa: E731
    ops12 = {k: ops[k] + 11 * layer[k] for k in layer}
    rest_per_byte = max(0.0, p["W"] - he(one["he_ops_per_token"])) / p["B"]  # 2PC halves, H2S, ct×ct
    client_per_byte = (p["C"] + p["G"]) / p["B"]
    g = {"W": he(ops12) + rest_per_byte * B, "C": client_per_byte * B, "G": 0.0, "Y": 0.0, "P": 12, "o": p["o"], "oc": p["oc"],
         "R": R, "B": B, "alpha": p["alpha"], "ops": ops12, "vocab_ops": vocab, "layer_ops": layer,
         "layer_rounds": layer_rounds, "head_rounds": head_rounds, "layer_bytes": layer_bytes, "vocab_bytes": vocab_bytes, "unit_costs_s": unit}
    notes = ["per layer: the one-layer GPT-2-width run (context 16) minus its vocabulary part, whose ct×pt and "
             "rotations come from the public plans (embed_plan x shards, head_plan) and bytes from its ciphertexts (wire forms)",
             "rounds per layer and head measured in process at GPT-2 base's heads and LayerNorm range "
             "(docs/bench/rounds.json, moved to context 128 by the softmax's extra tree levels); the vocabulary's "
             "rounds: the one-layer GPT-2-width run minus that layer", "ct×pt and rotation at Pyfhel's measured medians (he_floor.json); the rest of the "
             "workers' CPU, and the client's, per byte as in the shipped model's 1-worker run",
             "link cost serial: rounds x rtt + bytes / bandwidth (no overlap: an upper bound)",
             "parallelism capped at 12 workers (heads per layer); the vocabulary shards (50) could go further",
             "context 16 (the one-layer run's); attention at 128 adds ct×pt per cached ciphertext"]
    return g, notes


def _unit(fl: dict, kind: str) -> float:
    """Median seconds of one Pyfhel BFV op from the floor benchmark's JSON (scripts/bench_he_floor.py)."""
    key = {"ct_pt": "engine_mul_ct_pt", "rotation": "rotate_1_out_of_place"}[kind]
    try:
        return fl["pyfhel_bfv"][key]["median_us"] / 1e6
    except (KeyError, TypeError):
        raise SystemExit(f"error: no {key} timing in docs/bench/he_floor.json; run scripts/bench_he_floor.py") from None


def _plot(proj: dict, path: Path, cores: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prof, style in (("loopback", "-"), ("lan", "--"), ("wan", ":")):
        for c, color in ((str(cores), "tab:blue"), ("64", "tab:orange")):
            rows = proj[prof][c]
            ax.plot([r["workers"] for r in rows], [r["s"] for r in rows], style, color=color, marker="o", ms=3,
                    label=f"{prof}, {c} cores")
    ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="s per decoded token (projected)",
           title="GPT-2 base, projected (rounds at 128 context; HE work, bytes at 16)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", default="wikitext2")
    m.add_argument("--workers", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    m.add_argument("--context", type=int, default=16)
    m.add_argument("--tokens", type=int, default=3)
    m.add_argument("--cluster", action="store_true")
    m.add_argument("--provider", choices=("dealer", "he"), default="dealer",
                   help="dealer: a dealer in this process (one-round comparisons); he: the dealer-free provider")
    m.add_argument("--out", default="docs/bench/scaling_runs.json")
    p = sub.add_parser("model")
    p.add_argument("--runs", default="docs/bench/scaling_runs.json")
    p.add_argument("--out", default="docs/bench/scaling.json")
    p.add_argument("--client-growth", type=float, default=None,
                   help="the client's extra CPU per added worker in the GPT-2 projection (default: fitted from "
                        "the 1- and 2-worker runs, which on 2 cores includes their contention)")
    args = ap.parse_args()
    if args.cmd == "model" and args.client_growth is not None and not 0 <= args.client_growth <= 10:
        ap.error("--client-growth must be in [0, 10]")
    if args.cmd == "measure" and (min(args.workers) < 1 or args.workers[0] != 1 or args.context < 1 or args.tokens < 1):
        ap.error("--workers must start with 1 (the model is fitted on it), --context and --tokens >= 1")
    (measure if args.cmd == "measure" else model)(args)


if __name__ == "__main__":
    main()
