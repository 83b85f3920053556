"""``cryptogen bench``: secure decode cost by context length, kv-reuse vs recompute, and workers.

For each context length C a prompt of C random token ids is prefilled, then ``tokens`` tokens are
decoded (the first one sees C cached tokens); per decoded token we record latency (median), bytes
client<->server, protocol rounds and the server's HE operations (mean), and after the prefill the
encrypted KV-cache size. ``recompute`` (no cache, whole prefix again per token) is measured only
up to ``recompute_max_context``. A worker sweep measures kv-reuse at one context per worker count.

Backends: ``inprocess`` (both parties as threads of this process: deterministic counts, but the
GIL serialises the workers) and ``ray`` (SecureGenerator on an embedded or given Ray cluster:
one process per worker, so only it shows parallel speedup; the sweep uses it by default).
No tokenizer is needed: prompts are random token ids.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_CONTEXTS = (64, 128, 256, 512)
MODES = ("kv-reuse", "recompute")
OPS = ("ct_pt_mul", "ct_ct_mul", "rotations")
TRAFFIC = ("to_server", "to_client", "rounds")
BACKENDS = ("inprocess", "ray")


class BenchError(ValueError):
    """Bad ``cryptogen bench`` input (reported before any work)."""


@dataclass
class BenchOptions:
    model: str = "wikitext2"
    gpt2_base_layers: int | None = None
    contexts: str | None = None  # None: DEFAULT_CONTEXTS, the largest capped to what fits the model
    tokens: int = 3
    workers: str = "1,2"
    ray: bool = False  # main table on Ray (else in-process with the first worker count)
    sweep_backend: str = "ray"
    sweep_context: int | None = None  # None: the largest context <= 128
    recompute_max_context: int = 128
    max_minutes: float = 240.0
    out: str = "docs/bench/bench.json"
    seed: int = 0
    address: str | None = None
    command: str = ""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BenchError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"{what} must be positive integers, got {text!r}")
    return sorted(set(vals))


# ---- model ---------------------------------------------------------------------------------
def gpt2_base_config(layers: int):
    from .model import GPTConfig
    return GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=layers, n_head=12)


def model_config(opts: BenchOptions):
    """The model's config without loading weights (no tokenizer needed)."""
    from .model import GPT, GPTConfig
    from .registry import resolve_model

    if opts.gpt2_base_layers is not None:
        if opts.gpt2_base_layers < 1:
            raise BenchError(f"--gpt2-base-layers must be >= 1, got {opts.gpt2_base_layers}")
        return gpt2_base_config(opts.gpt2_base_layers), f"gpt2-base shape, {opts.gpt2_base_layers} layer(s), random"
    folder = resolve_model(opts.model)
    try:
        return GPTConfig.from_hf(json.loads((folder / "config.json").read_text())), str(opts.model)
    except (OSError, json.JSONDecodeError):
        return GPT.from_pretrained(folder).config, str(opts.model)  # raises a clear CheckpointError


def load_model(opts: BenchOptions, cfg):
    import torch

    from .model import GPT
    from .registry import resolve_model

    if opts.gpt2_base_layers is None:
        return GPT.from_pretrained(resolve_model(opts.model))
    torch.manual_seed(opts.seed)
    return GPT(cfg).eval()


def validate(opts: BenchOptions):
    """(cfg, model label, contexts, worker counts, sweep context); raises BenchError before any work."""
    from .scheduler.plan import make_plan

    if opts.tokens < 1:
        raise BenchError(f"--tokens must be >= 1, got {opts.tokens}")
    if opts.sweep_backend not in BACKENDS:
        raise BenchError(f"--sweep-backend must be one of {', '.join(BACKENDS)}, got {opts.sweep_backend!r}")
    if opts.max_minutes <= 0:
        raise BenchError(f"--max-minutes must be positive, got {opts.max_minutes}")
    cfg, label = model_config(opts)
    fit = cfg.n_positions - opts.tokens  # positions 0 .. C + tokens - 1 must exist
    if opts.contexts is None:
        contexts = sorted({min(c, fit) for c in DEFAULT_CONTEXTS if fit >= 1})
        if max(DEFAULT_CONTEXTS) > fit:
            log(f"default contexts capped at {fit} (= context {cfg.n_positions} - {opts.tokens} decode tokens)")
    else:
        contexts = _ints(opts.contexts, "--contexts")
    if not contexts or max(contexts) > fit:
        raise BenchError(f"context {max(contexts, default=0)} + {opts.tokens} decode token(s) exceed the model's "
                         f"context of {cfg.n_positions}; use --contexts up to {fit} or fewer --tokens")
    workers = _ints(opts.workers, "--workers")
    for w in workers:
        make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, w)  # PlanError (one line) if impossible
    sweep_ctx = opts.sweep_context or max([c for c in contexts if c <= 128] or [min(contexts)])
    if sweep_ctx > fit:
        raise BenchError(f"--sweep-context {sweep_ctx} + {opts.tokens} token(s) exceed the model's context "
                         f"of {cfg.n_positions}")
    return cfg, label, contexts, workers, sweep_ctx


# ---- backends: run one (mode, prompt) and report per-token deltas of cumulative counters ------
class _Recorder:
    def __init__(self, totals, kv, progress):
        self.totals, self.kv, self.progress = totals, kv, progress
        self.prefill_s, self.decode_s, self.deltas, self.kv_after = None, [], [], None
        self._before = None

    def on_step(self, timing) -> None:
        now = self.totals()
        if timing.phase == "prefill":
            self.prefill_s, self.kv_after = timing.seconds, self.kv()
        else:
            self.decode_s.append(timing.seconds)
            self.deltas.append({k: now[k] - self._before[k] for k in now})
        self._before = now
        self.progress(timing)

    def result(self) -> dict:
        mean = {k: sum(d[k] for d in self.deltas) / len(self.deltas) for k in self.deltas[0]}
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "median_decode_s": statistics.median(self.decode_s),
                "he_ops_per_token": {k: mean[k] for k in OPS},
                "bytes_per_token": {"to_server": mean["to_server"], "to_client": mean["to_client"],
                                    "total": mean["to_server"] + mean["to_client"]},
                "rounds_per_token": mean["rounds"], "kv_cache_after_prefill": self.kv_after}


def _traffic(chans) -> dict:
    phases = [ph for ch in chans for ph in ch.stats.phases.values()]
    return {"to_server": sum(p.bytes_sent for p in phases), "to_client": sum(p.bytes_recv for p in phases),
            "rounds": sum(p.rounds for p in phases)}


def _client_traffic(actor) -> dict:
    """Runs inside the client actor (``__ray_call__``): its channels' cumulative counters."""
    return _traffic([p.chan for parties in actor.parties.values() for p in parties.values()])


class InProcessBackend:
    name = "inprocess"

    def __init__(self, model, workers: int):
        from .scheduler.inprocess import InProcessRunner
        from .scheduler.plan import make_plan

        self.cfg = model.config
        self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, workers)
        self.runner = InProcessRunner(model, self.plan, [0])  # weights encoded and keys made once

    def _totals(self) -> dict:
        he = {k: sum(getattr(s.stats, k) for s in self.runner.shards.values()) for k in OPS}
        return {**he, **_traffic([p.chan for p in self.runner.client_parties.values()])}

    def _kv(self) -> dict:
        stats = [s.cache_stats() for s in self.runner.shards.values()]
        return {k: sum(s[k] for s in stats) for k in ("ciphertexts", "bytes")}

    def run(self, mode: str, prompt: list[int], tokens: int, progress) -> dict:
        from .client.session import ClientSession
        from .scheduler.driver import Driver

        r = self.runner
        r.client.close()
        r.client = ClientSession(self.cfg, self.plan, r.keys, prompt)  # a fresh session, same keys and shards
        r.reset_cache()
        rec = _Recorder(self._totals, self._kv, progress)
        Driver(r, self.cfg, self.plan, mode).generate(len(prompt), tokens + 1, on_step=rec.on_step)
        return rec.result()

    def close(self) -> None:
        self.runner.client.close()


class RayBackend:
    name = "ray"

    def __init__(self, model, workers: int, address: str | None):
        import ray

        from .client.generate import SecureGenerator
        from .cluster.connect import connect

        self.started_ray = not ray.is_initialized()
        if self.started_ray:  # embedded: logical CPUs for the workers, the client and the dealer
            connect(address, num_cpus=None if address else max(4, workers + 2))
        self.model, self.workers, self.gens, self._new = model, workers, {}, SecureGenerator

    def _gen(self, mode: str):
        if mode not in self.gens:
            self.gens[mode] = self._new(self.model, workers=self.workers, mode=mode)
        return self.gens[mode]

    def run(self, mode: str, prompt: list[int], tokens: int, progress) -> dict:
        import ray

        gen = self._gen(mode)

        def totals() -> dict:
            stats = ray.get([w.stats.remote() for w in gen.pool.workers])
            he = {k: sum(s["he"][k] for s in stats) for k in OPS}
            return {**he, **ray.get(gen.client.__ray_call__.remote(_client_traffic))}

        def kv() -> dict:
            stats = ray.get([w.stats.remote() for w in gen.pool.workers])
            return {k: sum(s["kv"][k] for s in stats) for k in ("ciphertexts", "bytes")}

        rec = _Recorder(totals, kv, progress)
        gen.generate(prompt, tokens + 1, on_step=lambda t, _n: rec.on_step(t))
        return rec.result()

    def close(self) -> None:
        for gen in self.gens.values():
            gen.close()
        self.gens = {}


# ---- the run ---------------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name")) or cpu
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "sched_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


def kv_summary(kv: dict, context: int, cfg) -> dict:
    """Allocated bytes (whole ciphertexts) and the layout's marginal bytes per token per layer."""
    from .he.kvcache import KVLayout
    from .he.params import HEConfig

    tpc = KVLayout(cfg.d_head, HEConfig().n).tpc
    ct = kv["bytes"] / kv["ciphertexts"] if kv["ciphertexts"] else 0
    marginal = 2 * ct * cfg.n_head / tpc  # K and V, all heads, one layer
    return {**kv, "ciphertext_bytes": ct, "tokens_per_ciphertext": tpc,
            "bytes_per_token_per_layer": kv["bytes"] / (context * cfg.n_layer),
            "marginal_bytes_per_token_per_layer": marginal, "bytes_used": marginal * cfg.n_layer * context}


def run(opts: BenchOptions) -> dict:
    import numpy as np

    cfg, label, contexts, workers, sweep_ctx = validate(opts)
    deadline = time.monotonic() + 60 * opts.max_minutes
    t_start = time.monotonic()
    log(f"model {label}: d={cfg.n_embd}, {cfg.n_layer} layer(s), {cfg.n_head} heads, vocab {cfg.vocab_size}; "
        f"contexts {contexts}, {opts.tokens} decode token(s), workers {workers}")
    model = load_model(opts, cfg)
    rng = np.random.default_rng(opts.seed)
    prompt_all = rng.integers(0, cfg.vocab_size, max(contexts + [sweep_ctx])).tolist()
    backends: dict = {}
    made: list = []  # every backend made (to know whether this run started Ray)
    results: dict = {}  # (backend, workers, mode, context) -> measurement

    def backend(name: str, w: int):
        if (name, w) not in backends:
            log(f"setting up {name} backend, {w} worker(s) (keys, weight encoding)...")
            backends[(name, w)] = InProcessBackend(model, w) if name == "inprocess" else RayBackend(model, w, opts.address)
            made.append(backends[(name, w)])
        return backends[(name, w)]

    def measure(name: str, w: int, mode: str, ctx: int) -> dict:
        key = (name, w, mode, ctx)
        if key in results:
            return results[key]
        if time.monotonic() > deadline:
            return {"skipped": "time limit (--max-minutes)"}
        t0 = time.monotonic()

        def progress(t):
            what = "prefill" if t.phase == "prefill" else f"decode @{t.position}"
            log(f"{mode} ctx {ctx} [{name}, {w}w]: {what} {t.seconds:.2f} s (elapsed {time.monotonic() - t_start:.0f} s)")

        res = backend(name, w).run(mode, prompt_all[:ctx], opts.tokens, progress)
        res["wall_s"] = time.monotonic() - t0
        results[key] = res
        return res

    main_backend, main_w = ("ray" if opts.ray else "inprocess"), workers[0]
    rows = []
    try:
        for ctx in contexts:
            row = {"context": ctx, "kv-reuse": measure(main_backend, main_w, "kv-reuse", ctx)}
            if ctx > opts.recompute_max_context:
                row["recompute"] = {"skipped": "too slow (--recompute-max-context)"}
            else:
                row["recompute"] = measure(main_backend, main_w, "recompute", ctx)
            kv, rc = row["kv-reuse"], row["recompute"]
            row["ratio"] = (rc["median_decode_s"] / kv["median_decode_s"]
                            if "median_decode_s" in rc and "median_decode_s" in kv else None)
            if kv.get("kv_cache_after_prefill"):
                row["kv_cache"] = kv_summary(kv["kv_cache_after_prefill"], ctx, cfg)
            rows.append(row)
        sweep = []
        for w in workers:
            m = measure(opts.sweep_backend, w, "kv-reuse", sweep_ctx)
            if (opts.sweep_backend, w) in backends:  # free the worker processes before the next count
                backends.pop((opts.sweep_backend, w)).close()
            sweep.append({"workers": w, "backend": opts.sweep_backend, "context": sweep_ctx, **m})
        base = next((s.get("median_decode_s") for s in sweep if "median_decode_s" in s), None)
        for s in sweep:
            s["speedup"] = base / s["median_decode_s"] if base and "median_decode_s" in s else None
    finally:
        for b in backends.values():
            b.close()
        if any(getattr(b, "started_ray", False) for b in made):
            from .cluster.connect import shutdown
            shutdown()

    return {
        "meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "command": opts.command, "machine": machine(), "model": label, "config": asdict(cfg),
                 "backend": main_backend, "main_workers": main_w, "tokens": opts.tokens,
                 "recompute_max_context": opts.recompute_max_context, "seed": opts.seed,
                 "total_seconds": time.monotonic() - t_start, "he_n": _he_n(),
                 "notes": ["latency: median over decoded tokens; counts and bytes: mean per decoded token",
                           "HE ops are the server's (all workers); bytes are client<->server channel bytes",
                           "kv_cache.bytes: allocated ciphertexts after the prefill (whole ciphertexts); "
                           "bytes_used: the layout's marginal cost x tokens"]},
        "contexts": rows, "workers": sweep}


def _he_n() -> int:
    from .he.params import HEConfig
    return HEConfig().n


# ---- outputs ---------------------------------------------------------------------------------
def _ms(m: dict) -> str:
    return f"{1000 * m['median_decode_s']:.0f}" if "median_decode_s" in m else f"skipped ({m.get('skipped', '?')})"


def _mib(b) -> str:
    return f"{b / 2**20:.2f}"


def markdown(report: dict) -> str:
    meta, mc = report["meta"], report["meta"]["machine"]
    out = [f"# Secure decode benchmark ({meta['model']})", "",
           f"`{meta['command']}` — {meta['date']}, {mc['nproc']} CPU(s) ({mc['cpu_model']}), backend "
           f"{meta['backend']} with {meta['main_workers']} worker(s), {meta['tokens']} decode token(s) per point, "
           f"total {meta['total_seconds'] / 60:.1f} min.", "",
           "| context | kv-reuse ms/token | recompute ms/token | recompute / kv-reuse | kv-reuse KiB/token | "
           "recompute KiB/token | KV cache MiB | KV KiB/token/layer (alloc / marginal) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in report["contexts"]:
        kv, rc, c = r["kv-reuse"], r["recompute"], r.get("kv_cache", {})
        kib = lambda m: f"{m['bytes_per_token']['total'] / 1024:.0f}" if "bytes_per_token" in m else "—"  # noqa: E731
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "—"
        kvs = (f"{_mib(c['bytes'])} | {c['bytes_per_token_per_layer'] / 1024:.1f} / "
               f"{c['marginal_bytes_per_token_per_layer'] / 1024:.1f}" if c else "— | —")
        out.append(f"| {r['context']} | {_ms(kv)} | {_ms(rc)} | {ratio} | {kib(kv)} | {kib(rc)} | {kvs} |")
    out += ["", "HE operations per decoded token (server, all workers):", "",
            "| context | mode | ct×pt | ct×ct | rotations | rounds |", "|---|---|---|---|---|---|"]
    for r in report["contexts"]:
        for mode in MODES:
            m = r[mode]
            if "he_ops_per_token" in m:
                o = m["he_ops_per_token"]
                out.append(f"| {r['context']} | {mode} | {o['ct_pt_mul']:.0f} | {o['ct_ct_mul']:.0f} | "
                           f"{o['rotations']:.0f} | {m['rounds_per_token']:.0f} |")
    if report["workers"]:
        s0 = report["workers"][0]
        out += ["", f"Worker sweep (kv-reuse, context {s0['context']}, backend {s0['backend']}):", "",
                "| workers | ms/token | speedup | prefill s | KiB/token |", "|---|---|---|---|---|"]
        for s in report["workers"]:
            sp = f"{s['speedup']:.2f}x" if s.get("speedup") else "—"
            pre = f"{s['prefill_s']:.1f}" if "prefill_s" in s else "—"
            kib = f"{s['bytes_per_token']['total'] / 1024:.0f}" if "bytes_per_token" in s else "—"
            out.append(f"| {s['workers']} | {_ms(s)} | {sp} | {pre} | {kib} |")
    return "\n".join(out + [""] + [f"- {n}" for n in meta["notes"]]) + "\n"


def plots(report: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, paths = report["contexts"], []
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in zip(MODES, "os"):
        pts = [(r["context"], r[mode]["median_decode_s"]) for r in rows if "median_decode_s" in r[mode]]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=mode)
    ax.set(xlabel="context (cached tokens)", ylabel="seconds per decoded token", yscale="log",
           title=f"Secure decode latency ({report['meta']['model']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(folder / "latency.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    kv = [(r["context"], r["kv_cache"]) for r in rows if "kv_cache" in r]
    if kv:
        ax.plot([c for c, _ in kv], [k["bytes"] / 2**20 for _, k in kv], marker="o", label="allocated ciphertexts")
        ax.plot([c for c, _ in kv], [k["bytes_used"] / 2**20 for _, k in kv], marker="s", ls="--",
                label="marginal bytes x tokens")
    ax.set(xlabel="context (cached tokens)", ylabel="encrypted KV cache (MiB)", title="Encrypted KV-cache memory")
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(folder / "memory.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_outputs(report: dict, out: str) -> tuple[Path, Path, list[Path], str]:
    json_path = Path(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md)
    return json_path, md_path, plots(report, json_path.parent), md
