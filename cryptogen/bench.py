"""``cryptogen bench``: secure decode cost by context length, kv-reuse vs recompute, and workers.

For each context C a prompt of C random token ids (no tokenizer needed) is prefilled, then ``tokens``
tokens are decoded (the first sees C cached tokens): latency (median), client<->server bytes, rounds
and the server's HE ops (mean) per decoded token, and the encrypted KV-cache size after the prefill.
``recompute`` (no cache: the whole prefix again per token) runs up to ``recompute_max_context``; in
process its prefill is skipped (it keeps no state between tokens, so it cannot change a decode step).
Backends: ``inprocess`` (both parties as threads: deterministic counts, but the GIL serialises the
workers) and ``ray`` (``bench_ray``: a local ``cryptogen serve`` in its own process, one process per
worker, this process its client over TLS: the only one to show parallel speedup, so the worker sweep
uses it by default).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .mpc.provider import next_step_items

DEFAULT_CONTEXTS = (64, 128, 256, 512)
MODES = ("kv-reuse", "recompute")
OPS = ("ct_pt_mul", "ct_ct_mul", "rotations")
# ... but at most this many per worker (both parties' halves, with DCF keys, ~3 GB): a recompute step at
# 128 context takes a whole prefill's, which held ahead did not fit in 23 GB; the rest is made in the step
AHEAD_MAX = {"triple": 1 << 25, "bits": 1 << 20, "tbits": 1 << 21}
BACKENDS = ("inprocess", "ray")
CPU_ROLES = ("client", "workers", "gateway", "ray")  # the ray backend's parties (bench_ray.server_cpu)
NOTES = ["latency: median over decoded tokens; HE ops (the server's, all workers), client<->server bytes and "
         "rounds: mean per decoded token", "KV cache: allocated = whole ciphertexts after the prefill; marginal = "
         "the layout's bytes per added token (2 x ciphertext bytes x head groups / tokens per ciphertext)",
         "in-process kv-reuse grows one session's cache from context to context (chunked prefill of the "
         "prefill_tokens between them); a decode step at context C is the same as after a fresh prefill of C",
         "in process, the dealer makes a decode step's correlated randomness before the step, untimed "
         "(dealer_ahead_s: its seconds), from what the previous decode step took, as the deployed client's offline "
         "phase does before a request; the first decode step after a prefill makes its items on demand, inside the step"]


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
    grow: bool = True  # in-process kv-reuse: one session grown context to context (chunked prefill)
    out: str = "docs/bench/bench.json"
    seed: int = 0
    address: str | None = None
    command: str = ""


def command_line(opts: BenchOptions) -> str:
    """The ``cryptogen bench`` command that reproduces ``opts`` (options that differ from the defaults)."""
    base = BenchOptions()
    parts = ["cryptogen", "bench"]
    for k, v in asdict(opts).items():
        if k != "command" and v != getattr(base, k):
            parts += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", shlex.quote(str(v))]
    return " ".join(parts)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _ints(text: str, what: str, example: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BenchError(f"{what} must be comma-separated integers, got {text!r}; use e.g. {example}") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"{what} must be positive integers, got {text!r}; use e.g. {example}")
    return sorted(set(vals))


def model_config(opts: BenchOptions):
    """(config, label) without loading weights (no tokenizer needed)."""
    from .model import GPT, GPTConfig
    from .registry import resolve_model
    if opts.gpt2_base_layers is not None:  # n_layer < 1: CheckpointError (a user error too)
        return (GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=opts.gpt2_base_layers, n_head=12),
                f"gpt2-base shape, {opts.gpt2_base_layers} layer(s), random weights")
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
    from .cli_common import check_choice, check_float, check_int, check_output_file, check_ray_address
    from .plan import make_plan
    check_int("--tokens", opts.tokens, 1, err=BenchError)
    check_choice("--sweep-backend", opts.sweep_backend, BACKENDS + ("none",), err=BenchError)
    check_float("--max-minutes", opts.max_minutes, 0.0, lo_open=True, err=BenchError)
    check_int("--recompute-max-context", opts.recompute_max_context, 0, err=BenchError)
    check_int("--seed", opts.seed, 0, 2 ** 64 - 1, err=BenchError)  # numpy and torch both take it
    if opts.gpt2_base_layers is not None:
        check_int("--gpt2-base-layers", opts.gpt2_base_layers, 1, err=BenchError)
    if opts.sweep_context is not None:
        check_int("--sweep-context", opts.sweep_context, 1, err=BenchError)
    if opts.address is not None:
        check_ray_address("--address", opts.address, err=BenchError)
    for flag, v in (("--contexts", opts.contexts), ("--workers", opts.workers)):
        if v is not None and not isinstance(v, str):
            raise BenchError(f"{flag} {v!r} is not allowed; use comma-separated integers, e.g. 1,2")
    check_output_file("--out", opts.out, err=BenchError)  # nothing is created before the measurements end
    cfg, label = model_config(opts)
    fit = cfg.n_positions - opts.tokens  # positions 0 .. C + tokens - 1 must exist
    if opts.contexts is None:
        contexts = sorted({min(c, fit) for c in DEFAULT_CONTEXTS if fit >= 1})
    else:
        contexts = _ints(opts.contexts, "--contexts", "64,128")
    sweep_ctx = opts.sweep_context or max([c for c in contexts if c <= 128] or contexts[:1] or [1])
    if not contexts or max(contexts + [sweep_ctx]) > fit:
        raise BenchError(f"context {max(contexts + [sweep_ctx])} + {opts.tokens} decode token(s) exceed the model's "
                         f"context of {cfg.n_positions}; use contexts up to {fit} or fewer --tokens")
    workers = _ints(opts.workers, "--workers", "1,2")
    for w in workers:
        make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, w)  # PlanError (one line) if impossible
    if opts.contexts is None and max(DEFAULT_CONTEXTS) > fit:  # a note once everything is known to be fine
        log(f"default contexts capped at {fit} (= context {cfg.n_positions} - {opts.tokens} decode tokens)")
    return cfg, label, contexts, workers, sweep_ctx


# ---- backends: run one (mode, prompt) and report per-token deltas of cumulative counters ------
class _Recorder:
    """Per-token deltas of cumulative counters; ``ahead`` (in process), called after every step with
    the position of the token it decoded (None after a prefill), makes the next step's correlated
    randomness and returns the seconds that took (offline: the deployed client does the same before a
    request, ``client/remote.py``)."""

    def __init__(self, totals, kv, progress, ahead=None):
        self.totals, self.kv, self.progress, self.ahead = totals, kv, progress, ahead
        self.prefill_s, self.decode_s, self.deltas, self.kv_after, self._before = None, [], [], None, None
        self.dealer_s, self._made = [], 0.0  # per decode step: dealer seconds spent before it (0: made online)

    def on_step(self, timing) -> None:
        now = self.totals()
        if timing.phase == "start":
            self._before = now
            self._next()
            return
        if timing.phase == "prefill":
            self.prefill_s, self.kv_after = timing.seconds, self.kv()
        else:
            self.decode_s.append(timing.seconds)
            self.dealer_s.append(self._made)
            self.deltas.append({k: now[k] - self._before[k] for k in now})
        self.progress(timing)
        self._next(timing.position if timing.phase == "decode" else None)
        self._before = self.totals()

    def _next(self, decoded_at: int | None = None) -> None:
        self._made = self.ahead(decoded_at) if self.ahead else 0.0

    def result(self) -> dict:
        m = {k: sum(d[k] for d in self.deltas) / len(self.deltas) for k in self.deltas[0]}
        ahead = {"dealer_ahead_s": self.dealer_s} if self.ahead else {}
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "median_decode_s": statistics.median(self.decode_s),
                **ahead, "he_ops_per_token": {k: m[k] for k in OPS}, "rounds_per_token": m["rounds"],
                "bytes_per_token": {"to_server": m["to_server"], "to_client": m["to_client"],
                                    "total": m["to_server"] + m["to_client"]}, "kv_cache_after_prefill": self.kv_after,
                **({"cpu_s_per_token": {k[4:]: m[k] for k in m if k.startswith("cpu_")}}
                   if any(k.startswith("cpu_") for k in m) else {})}


def _traffic(chans) -> dict:
    phases = [ph for ch in chans for ph in ch.stats.phases.values()]
    return {"to_server": sum(p.bytes_sent for p in phases), "to_client": sum(p.bytes_recv for p in phases),
            "rounds": sum(p.rounds for p in phases)}


def dealer_ahead(runner):
    """The in-process dealer working ahead of the steps, as in deployment: ``ahead(p)``, called after
    each step with the position it decoded (None after a prefill), makes for the next step what the
    decode step at p took, grown by ``mpc.provider.next_step_items`` (the remote dealer's rule: times
    1.02 + 2 / (p + 1), one more position attended), at most ``AHEAD_MAX``, and returns the seconds
    that took. After a prefill there is no such measure: the next step makes its items on demand, inside it."""
    parties = runner.client_parties

    def consumed() -> dict:
        return {w: dict(p.cr.counters()["consumed"]) for w, p in parties.items()}
    seen = consumed()

    def ahead(decoded_at: int | None) -> float:
        nonlocal seen
        now = consumed()
        took, seen = {w: {k: now[w].get(k, 0) - seen[w].get(k, 0) for k in AHEAD_MAX} for w in now}, now
        if decoded_at is None:
            return 0.0
        t0 = time.perf_counter()
        for w, d in took.items():
            parties[w].cr.preprocess(**{("triples" if k == "triple" else k): min(next_step_items(n, decoded_at), AHEAD_MAX[k])
                                        for k, n in d.items()})
        return time.perf_counter() - t0
    return ahead


class InProcessBackend:
    def __init__(self, model, workers: int):
        from .scheduler.inprocess import InProcessRunner
        from .plan import make_plan
        self.cfg = model.config
        self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, workers)
        self.runner = InProcessRunner(model, self.plan, [0])  # weights encoded and keys made once

    def _totals(self) -> dict:
        he = {k: sum(getattr(s.stats, k) for s in self.runner.shards.values()) for k in OPS}
        return {**he, **_traffic([p.chan for p in self.runner.client_parties.values()])}

    def _kv(self) -> dict:
        return {k: sum(s.cache_stats()[k] for s in self.runner.shards.values()) for k in ("ciphertexts", "bytes")}

    def _recorder(self, progress) -> _Recorder:
        return _Recorder(self._totals, self._kv, progress, dealer_ahead(self.runner))

    def run(self, mode: str, prompt: list[int], tokens: int, progress) -> dict:
        from .client.session import ClientSession
        from .driver import Driver, StepTiming
        r, C = self.runner, len(prompt) - 1  # prompt: the C context tokens + the first token to decode
        r.client.close()
        rec = self._recorder(progress)
        driver = Driver(r, self.cfg, self.plan, mode)
        if mode == "kv-reuse":
            r.client = ClientSession(self.cfg, self.plan, r.keys, prompt[:C])  # fresh session, same keys and shards
            r.reset_cache()
            driver.generate(C, tokens + 1, on_step=rec.on_step)
            return rec.result()
        # recompute keeps no state between tokens, so its prefill cannot change a decode step: skip it and
        # decode from position C directly (the step re-runs all C + 1 tokens, as after a prefill).
        r.client = ClientSession(self.cfg, self.plan, r.keys, prompt)
        r.reset_cache()
        rec.on_step(StepTiming(C - 1, "start", 0.0))
        for i in range(tokens):
            rec.on_step(driver.decode_one_token(C + i))
        return rec.result()

    def run_growing(self, contexts: list[int], prompt: list[int], tokens: int, progress, deadline) -> dict:
        """kv-reuse at increasing contexts in one session: after the decode steps at context C the
        cache grows to the next context by one chunked prefill pass over more prompt tokens (the
        decode step at a context is the same as after a fresh prefill; the prefill work is shared)."""
        from .client.session import ClientSession
        from .driver import Driver
        r, out, done = self.runner, {}, 0
        r.client.close()
        r.client = ClientSession(self.cfg, self.plan, r.keys, prompt[:contexts[0]])
        r.reset_cache()
        driver = Driver(r, self.cfg, self.plan, "kv-reuse")
        for C in contexts:
            if time.monotonic() > deadline:
                break
            rec = self._recorder(lambda t, C=C: progress(C, t))
            r.client.tokens = r.client.tokens[:done] + prompt[done:C]  # cached tokens, then more prompt
            log(f"context {C}: prefill of {C - done} more tokens in one pass "
                f"(about a decode step's time per token; no progress lines until it ends)...")
            rec.on_step(driver.extend(done, C - done))
            for i in range(tokens):
                rec.on_step(driver.decode_one_token(C + i))
            out[C] = {**rec.result(), "prefill_tokens": C - done}
            done = C + tokens
        return out

    def close(self) -> None:
        self.runner.client.close()


def git_commit() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"nproc": os.cpu_count(), "sched_cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


def kv_summary(kv: dict, context: int, cfg, workers: int) -> dict:
    """Allocated bytes (whole ciphertexts) and the layout's marginal bytes per token per layer."""
    from .he.params import HEConfig
    from .plan import make_plan
    from .secure_plan import kv_layouts
    lays = kv_layouts(cfg, make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, workers), HEConfig().n)
    tpc = min(lay.tpc for lay in lays)
    ct = kv["bytes"] / kv["ciphertexts"] if kv["ciphertexts"] else 0
    marginal = 2 * ct * sum(1 / lay.tpc for lay in lays) / cfg.n_layer  # K and V, every head group, one layer
    return {**kv, "ciphertext_bytes": ct, "tokens_per_ciphertext": tpc,
            "bytes_per_token_per_layer": kv["bytes"] / (context * cfg.n_layer),
            "marginal_bytes_per_token_per_layer": marginal, "bytes_used": marginal * cfg.n_layer * context}


def _ratio(slow: dict, fast: dict) -> float | None:
    ok = "median_decode_s" in slow and "median_decode_s" in fast
    return slow["median_decode_s"] / fast["median_decode_s"] if ok else None


def run(opts: BenchOptions) -> dict:
    import numpy as np
    cfg, label, contexts, workers, sweep_ctx = validate(opts)
    deadline = time.monotonic() + 60 * opts.max_minutes
    t_start, commit = time.monotonic(), git_commit()  # the code this process runs
    log(f"model {label}: d={cfg.n_embd}, {cfg.n_layer} layer(s), {cfg.n_head} heads, vocab {cfg.vocab_size}; "
        f"contexts {contexts}, {opts.tokens} decode token(s), workers {workers}")
    model = load_model(opts, cfg)
    rng = np.random.default_rng(opts.seed)
    prompt_all = rng.integers(0, cfg.vocab_size, max(contexts + [sweep_ctx]) + 1).tolist()
    backends, results, ray_model = {}, {}, {}  # ray_model: the servers' checkpoint folder (made on first use)

    def backend(name: str, w: int):
        if (name, w) not in backends:
            log(f"setting up {name} backend, {w} worker(s) (keys, weight encoding)...")
            if name == "inprocess":
                backends[(name, w)] = InProcessBackend(model, w)
            else:
                from .bench_ray import RayBackend, model_folder
                if not ray_model:
                    ray_model["folder"], ray_model["tmp"] = model_folder(opts, model)
                backends[(name, w)] = RayBackend(ray_model["folder"], w, opts.address)
        return backends[(name, w)]

    def measure(name: str, w: int, mode: str, ctx: int) -> dict:
        key = (name, w, mode, ctx)
        if key in results or time.monotonic() > deadline:
            return results.get(key, {"skipped": "time limit (--max-minutes)"})
        t0 = time.monotonic()
        progress = lambda t: log(  # noqa: E731
            f"{mode} ctx {ctx} [{name}, {w} worker(s)]: {t.phase} @{t.position} {t.seconds:.2f} s "
            f"(elapsed {time.monotonic() - t_start:.0f} s)")
        results[key] = r = backend(name, w).run(mode, prompt_all[:ctx + 1], opts.tokens, progress)
        r["wall_s"] = time.monotonic() - t0
        return r

    main_backend, main_w = ("ray" if opts.ray else "inprocess"), workers[0]
    rows = []
    try:
        if main_backend == "inprocess" and opts.grow and all(b >= a + opts.tokens for a, b in zip(contexts, contexts[1:])):
            t0 = time.monotonic()
            progress = lambda ctx, t: log(  # noqa: E731
                f"kv-reuse ctx {ctx} [inprocess, {main_w} worker(s), growing]: {t.phase} @{t.position} "
                f"{t.seconds:.2f} s (elapsed {time.monotonic() - t_start:.0f} s)")
            grown = backend("inprocess", main_w).run_growing(contexts, prompt_all, opts.tokens, progress, deadline)
            for ctx, r in grown.items():
                results[("inprocess", main_w, "kv-reuse", ctx)] = {**r, "wall_s": time.monotonic() - t0}
        for ctx in contexts:
            kv = measure(main_backend, main_w, "kv-reuse", ctx)
            rc = (measure(main_backend, main_w, "recompute", ctx) if ctx <= opts.recompute_max_context
                  else {"skipped": "too slow (--recompute-max-context)"})
            rows.append({"context": ctx, "kv-reuse": kv, "recompute": rc, "ratio": _ratio(rc, kv)})
            if kv.get("kv_cache_after_prefill"):
                rows[-1]["kv_cache"] = kv_summary(kv["kv_cache_after_prefill"], ctx, cfg, main_w)
        sweep = []
        for w in (workers if opts.sweep_backend != "none" else []):  # one backend at a time (frees memory and worker processes); results are cached
            for key in list(backends):
                backends.pop(key).close()
            sweep.append({"workers": w, "backend": opts.sweep_backend, "context": sweep_ctx,
                          **measure(opts.sweep_backend, w, "kv-reuse", sweep_ctx)})
            sweep[-1]["speedup"] = _ratio(sweep[0], sweep[-1])
    finally:
        for b in backends.values():
            b.close()
        if ray_model.get("tmp") is not None:
            ray_model["tmp"].cleanup()
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": opts.command
            or command_line(opts), "argv": sys.argv, "commit": commit, "machine": machine(), "model": label, "config": asdict(cfg),
            "backend": main_backend, "main_workers": main_w, "tokens": opts.tokens, "seed": opts.seed,
            "recompute_max_context": opts.recompute_max_context, "total_seconds": time.monotonic() - t_start}
    from .bench_ray import NOTE as RAY_NOTE
    notes = NOTES + ([RAY_NOTE] if main_backend == "ray" or (sweep and opts.sweep_backend == "ray") else [])
    return {"meta": {**meta, "notes": notes}, "contexts": rows, "workers": sweep}


# ---- outputs ---------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    meta, mc = report["meta"], report["meta"]["machine"]
    _ms = lambda m: (f"{1000 * m['median_decode_s']:.0f}" if "median_decode_s" in m  # noqa: E731
                     else f"skipped: {m.get('skipped', '?')}")
    _kib = lambda m: f"{m['bytes_per_token']['total'] / 1024:.0f}" if "bytes_per_token" in m else "—"  # noqa: E731
    out = [f"# Secure decode benchmark ({meta['model']})", "",
           f"`{meta['command']}` — {meta['date']}, {mc['nproc']} CPU(s) ({mc['cpu_model']}), backend "
           f"{meta['backend']} with {meta['main_workers']} worker(s), {meta['tokens']} decode token(s) per point, "
           f"total {meta['total_seconds'] / 60:.1f} min.", "",
           "| context | kv-reuse ms/token | recompute ms/token | recompute / kv-reuse | kv-reuse KiB/token | "
           "recompute KiB/token | KV cache MiB | KV KiB/token/layer (allocated / marginal) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in report["contexts"]:
        kv, rc, c = r["kv-reuse"], r["recompute"], r.get("kv_cache")
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] else "—"
        kvs = (f"{c['bytes'] / 2**20:.2f} | {c['bytes_per_token_per_layer'] / 1024:.1f} / "
               f"{c['marginal_bytes_per_token_per_layer'] / 1024:.1f}" if c else "— | —")
        out.append(f"| {r['context']} | {_ms(kv)} | {_ms(rc)} | {ratio} | {_kib(kv)} | {_kib(rc)} | {kvs} |")
    out += ["", "Per decoded token (HE ops: the server's, all workers):", "",
            "| context | mode | ct×pt | ct×ct | rotations | rounds |", "|---|---|---|---|---|---|"]
    for r in report["contexts"]:
        for mode in (m for m in MODES if "he_ops_per_token" in r[m]):
            o = r[mode]["he_ops_per_token"]
            out.append(f"| {r['context']} | {mode} | {o['ct_pt_mul']:.0f} | {o['ct_ct_mul']:.0f} | "
                       f"{o['rotations']:.0f} | {r[mode]['rounds_per_token']:.0f} |")
    if report["workers"]:
        s0 = report["workers"][0]
        out += ["", f"Worker sweep (kv-reuse, context {s0['context']}, backend {s0['backend']}):", "",
                "| workers | ms/token | speedup | prefill s | KiB/token | CPU s/token: client / workers / gateway / "
                "ray |", "|---|---|---|---|---|---|"]
        for s in report["workers"]:
            sp = f"{s['speedup']:.2f}x" if s.get("speedup") else "—"
            pre = f"{s['prefill_s']:.1f}" if s.get("prefill_s") else "—"
            c = s.get("cpu_s_per_token")
            cpu = " / ".join(f"{c[k]:.2f}" if k in c else "—" for k in CPU_ROLES) if c else "—"
            out.append(f"| {s['workers']} | {_ms(s)} | {sp} | {pre} | {_kib(s)} | {cpu} |")
    return "\n".join(out + [""] + [f"- {n}" for n in meta["notes"]]) + "\n"


def plots(report: dict, folder: Path) -> list[Path]:
    """latency.png (both modes, log scale) and memory.png (KV cache) vs context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, kv = report["contexts"], [r for r in report["contexts"] if "kv_cache" in r]
    lat = [(mode, [(r["context"], r[mode]["median_decode_s"]) for r in rows if "median_decode_s" in r[mode]], st)
           for mode, st in zip(MODES, ("o-", "s-"))]
    mem = [("allocated ciphertexts", [(r["context"], r["kv_cache"]["bytes"] / 2**20) for r in kv], "o-"),
           ("marginal bytes x tokens", [(r["context"], r["kv_cache"]["bytes_used"] / 2**20) for r in kv], "s--")]
    figures = [("latency.png", lat, "seconds per decoded token", f"Secure decode latency ({report['meta']['model']})"),
               ("memory.png", mem, "encrypted KV cache (MiB)", "Encrypted KV-cache memory")]
    for name, series, ylabel, title in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts, style in (x for x in series if x[1]):
            ax.plot(*zip(*pts), style, label=label)
        ax.set(xlabel="context (cached tokens)", ylabel=ylabel, title=title,
               yscale="log" if name == "latency.png" else "linear")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
    return [folder / name for name, *_ in figures]


def write_outputs(report: dict, out: str) -> tuple[Path, Path, list[Path], str]:
    """JSON at ``out``; the Markdown table (.md) and latency.png, memory.png beside it."""
    json_path, md = Path(out), markdown(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(md)
    return json_path, json_path.with_suffix(".md"), plots(report, json_path.parent), md
