"""The ``cryptogen`` command line: train, eval, generate, serve, proxy, dealer, bench, init.

Errors the user can fix print one line (``error: <what was wrong>; <what to do>``) on stderr and
exit with code 2; ``--debug`` shows the traceback instead. Every flag is checked right after
parsing, before a model is loaded, Ray is started or HE keys are made: syntax (an unknown option,
a value that is not a number) by the command group below, values (ranges, choices, files, ports)
by each command's checks (``cli_common``).
"""
from __future__ import annotations

import sys
import time
from typing import NoReturn, Optional

import typer
from typer.core import TyperGroup

from .cli_common import (TokenStream, UsageError, check_choice, check_eval_args,  # noqa: F401  (re-exported)
                         check_float, check_generate_args, check_int, check_writable_dir, encode_prompt,
                         split_host_port)
from .memory import keep_freed_memory

# click's base class of the errors it shows to the user (``typer`` bundles its own copy of click)
_ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


class _OneLineErrors(TyperGroup):
    """Command-line syntax errors (an unknown option or command, a missing value, ``--top-k x``)
    as one line, ``error: ...; see 'cryptogen CMD --help'``, exit code 2 (click shows a usage box)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _ClickError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `cryptogen`: the help, not an error
                e.show()
                sys.exit(e.exit_code)
            msg = _one_line(e.format_message()).rstrip(".")
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path} --help" if ctx is not None else "cryptogen --help"
            _fail(f"{msg[:1].lower()}{msg[1:]}; see '{where}'", getattr(e, "exit_code", 2))
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="CryptoGen: secure GPT-2 generation (HE + 2PC, encrypted KV cache) on Ray.")
_state = {"debug": False}


def _user_errors() -> tuple:
    from .data import DataError
    from .field import FieldError
    from .model import CheckpointError
    from .registry import ModelNotFound
    from .tokenizer import TokenizerError

    from .bench import BenchError
    from .exporter import MetricsPortInUse
    from .cluster.connect import ClusterError
    from .mpc.errors import ChannelError
    from .net.control import ProtocolError, RemoteError
    from .net.tls import TLSError
    from .driver import DriverError
    from .plan import PlanError
    from .client.local_server import LocalServerError
    from .client.remote import ConnectError
    from .server.serve import ServeError
    from .init_checkpoint import InitError
    from .memory import MemoryModeError

    return (MemoryModeError, UsageError, DataError, CheckpointError, ModelNotFound, TokenizerError, FieldError,
            ClusterError, DriverError, PlanError, MetricsPortInUse, BenchError, ChannelError, ProtocolError,
            RemoteError, TLSError, ConnectError, LocalServerError, ServeError, InitError)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        if _state["debug"]:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(2)


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug
    _run(keep_freed_memory)  # every command's process (cryptogen/memory.py: why)


@app.command()
def train(
    data: str = typer.Option("wikitext2", help="Data set: wikitext2, ptb or lambada (LAMBADA trains on its dev set)."),
    out: Optional[str] = typer.Option(None, help="Output model folder (default models/DATA)."),
    run_dir: Optional[str] = typer.Option(None, help="Run folder for checkpoints (default runs/DATA)."),
    steps: int = typer.Option(1500, help="Optimiser steps (>= 1)."), batch: int = typer.Option(8, help=">= 1"),
    block: int = typer.Option(512, help="Tokens per training sequence (2..512)."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary (258..65536)."),
    n_embd: int = typer.Option(128, help=">= 8, a multiple of --n-head"), n_layer: int = typer.Option(2, help=">= 1"),
    n_head: int = typer.Option(4, help=">= 1"), lr: float = typer.Option(3e-3, help="Peak learning rate (> 0)."),
    seed: int = typer.Option(0), ckpt_every: int = typer.Option(100, help="Checkpoint every N steps (>= 1)."),
    resume: bool = typer.Option(False, help="Continue from the run folder's last checkpoint."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder (default ../shared/data or $CRYPTOGEN_DATA)."),
):
    """Train a small GPT-2 and its BPE tokenizer on the CPU."""
    def go():
        from .data import DATASETS, data_path
        from .train import TrainConfig

        check_choice("--data", data, DATASETS)
        for flag, v, lo, hi in (("--steps", steps, 1, None), ("--batch", batch, 1, None),
                                ("--block", block, 2, TrainConfig.n_positions),
                                ("--vocab-size", vocab_size, 258, 65536),  # ids are stored as uint16
                                ("--n-embd", n_embd, 8, None), ("--n-layer", n_layer, 1, None),
                                ("--n-head", n_head, 1, None), ("--seed", seed, 0, 2 ** 64 - 1),
                                ("--ckpt-every", ckpt_every, 1, None)):
            check_int(flag, v, lo, hi)
        if n_embd % n_head:
            raise UsageError(f"--n-embd {n_embd} is not a multiple of --n-head {n_head}; change one of them")
        check_float("--lr", lr, 0.0, lo_open=True)
        out_dir, runs = out or f"models/{data}", run_dir or f"runs/{data}"
        check_writable_dir("--out", out_dir)
        check_writable_dir("--run-dir", runs)
        data_path(data, "train", data_dir)  # one-line error before any work if the data is missing
        try:
            cfg = TrainConfig(dataset=data, out=out_dir, run_dir=runs, steps=steps, batch=batch, block=block,
                              vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, lr=lr, seed=seed,
                              ckpt_every=ckpt_every, data_dir=data_dir)
        except ValueError as e:
            raise UsageError(str(e)) from None
        from .train import train as run_train
        folder = run_train(cfg, resume=resume)
        typer.echo(f"saved {folder}")

    _run(go)


@app.command("eval")
def evaluate(
    model: str = typer.Option("wikitext2", help="Shipped model name or checkpoint folder."),
    data: Optional[str] = typer.Option(None, help="Data set (default: the model's own)."),
    split: str = typer.Option("test"),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens (>= 2)."),
    lambada: bool = typer.Option(False, help="Also report LAMBADA last-word accuracy."),
    lambada_limit: Optional[int] = typer.Option(None, help="Only the first N LAMBADA passages (>= 1)."),
    data_dir: Optional[str] = typer.Option(None),
    secure: bool = typer.Option(False, "--secure", help="Secure perplexity on a test subset, beside plaintext."),
    windows: int = typer.Option(4, help="--secure: number of windows (>= 1)."),
    window: int = typer.Option(128, help="--secure: tokens per window (2..the model's context)."),
    workers: int = typer.Option(1, help="--secure: workers of the local server (>= 1)."),
    address: Optional[str] = typer.Option(None, help="--secure: the local server joins this Ray cluster."),
    provider: str = typer.Option("he", help="--secure: correlated randomness, he (dealer-free) or dealer."),
    connect: Optional[str] = typer.Option(None, "--connect", help="--secure: a running server's connection file."),
    dealer: Optional[str] = typer.Option(None, help="--secure --provider dealer: the dealer's client connection file."),
):
    """Perplexity on a split (and LAMBADA accuracy) with the plaintext reference model."""
    def check():  # one-line errors before anything starts
        check_eval_args(windows=windows, window=window, workers=workers, address=address, provider=provider,
                        connect_file=connect, dealer=dealer, max_tokens=max_tokens, lambada_limit=lambada_limit)
    _run(check)
    if secure:
        from .secure_cli import secure_eval
        return _run(secure_eval, model, data, split, data_dir, windows, window, workers, address, provider,
                    connect_file=connect, dealer=dealer)
    from . import registry
    from .data import data_path
    from .evaluate import lambada_accuracy, perplexity

    def go():
        ds = data or (model if model in registry.SHIPPED else "wikitext2")
        data_path(ds, split, data_dir)  # a missing data file is reported before any work
        if lambada:
            data_path("lambada", "test", data_dir)
        m, tok, folder = registry.load(model)
        res = perplexity(m, tok, ds, split, data_dir, max_tokens)
        typer.echo(f"{folder.name} on {ds}/{split}: {res.tokens:,} tokens, perplexity {res.ppl:.2f} "
                   f"(per token), {res.word_ppl:.2f} (per word, {res.words:,} words)")
        if lambada:
            acc, n = lambada_accuracy(m, tok, data_dir, lambada_limit)
            typer.echo(f"{folder.name} LAMBADA last-word accuracy: {acc:.4f} on {n:,} passages")

    _run(go)


@app.command()
def generate(
    prompt: str = typer.Option(..., help="The prompt text."),
    model: str = typer.Option("wikitext2", help="Shipped model name or checkpoint folder."),
    max_new_tokens: int = typer.Option(32, help="Tokens to generate (>= 1; prompt + these fit the context)."),
    temperature: float = typer.Option(0.0, help="0 means greedy; else a finite number > 0."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0: all)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (>= 0)."),
    secure: bool = typer.Option(False, "--secure", help="Secure generation (HE + 2PC): against --connect's server, "
                                                        "or a local server started in its own process."),
    connect: Optional[str] = typer.Option(None, "--connect", help="Connection file a `cryptogen serve` wrote."),
    server: Optional[str] = typer.Option(None, help="Server HOST:PORT (instead of --connect)."),
    server_cert: Optional[str] = typer.Option(None, help="The server's certificate, PEM file (with --server)."),
    api_key: Optional[str] = typer.Option(None, envvar="CRYPTOGEN_API_KEY", help="API key (with --server)."),
    workers: int = typer.Option(1, help="Workers of the local server (no --connect; >= 1)."),
    mode: str = typer.Option("kv-reuse", help="kv-reuse (encrypted KV cache) or recompute (baseline)."),
    address: Optional[str] = typer.Option(None, help="The local server joins the Ray cluster at HOST:PORT."),
    provider: str = typer.Option("he", help="Correlated randomness: he (dealer-free, default) or dealer "
                                            "(a third party's `cryptogen dealer`, needs --dealer)."),
    dealer: Optional[str] = typer.Option(None, help="The dealer's client connection file (--provider dealer)."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve the client's Prometheus metrics on 127.0.0.1:PORT "
                                                          "(0..65535; 0: any free port)."),
    ban_unk: Optional[bool] = typer.Option(None, "--ban-unk/--no-ban-unk",
                                           help="Never sample the tokens that start <unk> (a logit mask; plaintext "
                                                "and secure alike). Default: on for the shipped models."),
    reveal: str = typer.Option("token", help="Secure generation: what this process learns per new token. token "
                                             "(default): only the token (2PC argmax; greedy or --temperature); "
                                             "logits: the logits (needed for --top-k)."),
):
    """Generate text, streaming tokens as they come."""
    is_secure = bool(secure or connect or server)
    sampling = _run(check_generate_args, prompt, max_new_tokens, (temperature, top_k, seed), workers=workers,
                    mode=mode, provider=provider, dealer=dealer, metrics_port=metrics_port, reveal=reveal,
                    address=address, connect_file=connect, server=server, server_cert=server_cert, secure=is_secure)
    if is_secure:
        from .secure_cli import generate_secure
        _run(generate_secure, prompt, model, max_new_tokens, sampling, workers, mode, address, provider, metrics_port,
             connect_file=connect, server=server, server_cert=server_cert, api_key=api_key, dealer=dealer,
             ban_unk=ban_unk, reveal=reveal)
    else:
        _run(_generate_plain, prompt, model, max_new_tokens, sampling.temperature, sampling.top_k, sampling.seed,
             ban_unk=ban_unk)


@app.command()
def serve(
    model: str = typer.Option("wikitext2", help="Shipped model name or checkpoint folder (read on each worker's node)."),
    workers: int = typer.Option(1, help="Worker actors (heads and feed-forward columns sharded over them; >= 1)."),
    layer_groups: int = typer.Option(1, help="Split the layers over this many worker groups (>= 1)."),
    address: Optional[str] = typer.Option(None, help="Join the Ray cluster at HOST:PORT (`ray start --head`); "
                                                     "default: an embedded local Ray."),
    listen: str = typer.Option("127.0.0.1:7860", help="TLS address for clients (0.0.0.0:PORT: every address)."),
    connection_file: str = typer.Option("cryptogen-server.json", help="Where to write the address, certificate "
                                                                       "and API key for clients (mode 0600)."),
    max_sessions: int = typer.Option(4, help="Sessions at once (>= 1); more get 'busy, retry after N s'."),
    idle_timeout: float = typer.Option(600.0, help="Seconds a session may wait for its client (> 0)."),
    resume_grace: float = typer.Option(20.0, help="Seconds a client whose connection dropped may resume its "
                                                  "session (0: never; 0..86400)."),
    kv_budget_mb: float = typer.Option(4096.0, help="Encrypted KV cache one session may hold, all workers (MiB, > 0); "
                                                    "a longer context is refused."),
    state_dir: Optional[str] = typer.Option(None, help="Certificate and API key folder "
                                                       "(default ~/.local/state/cryptogen/server)."),
    cert: Optional[str] = typer.Option(None, help="TLS certificate (PEM) instead of the self-signed one."),
    key: Optional[str] = typer.Option(None, help="Its private key (PEM)."),
    dealer: Optional[str] = typer.Option(None, help="The dealer's server connection file, to offer --provider dealer."),
    metrics_port: Optional[int] = typer.Option(None, help="Server metrics (sessions, HE ops, KV cache) on "
                                                          "127.0.0.1:PORT (0..65535; 0: any free port)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of the embedded Ray (no --address); default: "
                                                             "the machine's (>= 1)."),
    token_only: bool = typer.Option(False, "--token-only", help="Clients learn only generated tokens, never logits "
                                                               "(protects the LM head; refuses eval/--reveal logits)."),
):
    """Run the secure server (the model owner's side) until interrupted."""
    from .server.serve import ServeOptions, serve as run_serve

    opts = ServeOptions(model=model, workers=workers, layer_groups=layer_groups, address=address, listen=listen,
                        connection_file=connection_file, max_sessions=max_sessions, idle_timeout=idle_timeout,
                        state_dir=state_dir, cert=cert, key=key, metrics_port=metrics_port, dealer=dealer,
                        num_cpus=num_cpus, token_only=token_only, resume_grace=resume_grace,
                        kv_budget_mb=kv_budget_mb)
    _run(run_serve, opts)


@app.command()
def proxy(
    connect: str = typer.Option(..., "--connect", help="Connection file a `cryptogen serve` wrote."),
    listen: str = typer.Option("127.0.0.1:8000", help="HTTP address of the endpoint (loopback unless --allow-remote)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a non-loopback --listen address "
                                                                    "(needs --local-api-key)."),
    local_api_key: Optional[str] = typer.Option(None, envvar="CRYPTOGEN_PROXY_API_KEY",
                                                help="Clients must send `Authorization: Bearer KEY`."),
    provider: str = typer.Option("he", help="Correlated randomness: he (dealer-free) or dealer (needs --dealer)."),
    dealer: Optional[str] = typer.Option(None, help="The dealer's client connection file (--provider dealer)."),
    mode: str = typer.Option("kv-reuse", help="kv-reuse (encrypted KV cache) or recompute (baseline)."),
    ban_unk: Optional[bool] = typer.Option(None, "--ban-unk/--no-ban-unk",
                                           help="Never sample the tokens that start <unk>. Default: on for the "
                                                "shipped models."),
    max_sessions: int = typer.Option(16, help="Secure sessions of this proxy at once, >= 1 (the server has its "
                                                     "own limit: past it, requests get 429)."),
):
    """An OpenAI-compatible endpoint on this machine (/v1/completions, /v1/chat/completions, /v1/models):
    each request is a secure session whose client side runs here, against a `cryptogen serve`."""
    def go():
        from .client.proxy import ProxyConfigError, ProxyOptions, run_proxy
        try:
            run_proxy(ProxyOptions(connect=connect, listen=listen, local_api_key=local_api_key,
                                   allow_remote=allow_remote, provider=provider, mode=mode, dealer=dealer,
                                   ban_unk=ban_unk, max_sessions=max_sessions))
        except ProxyConfigError as e:
            raise UsageError(str(e)) from None
    _run(go)


@app.command("dealer")
def dealer_cmd(
    listen: str = typer.Option("127.0.0.1:7870", help="TLS address the two parties connect to."),
    state_dir: Optional[str] = typer.Option(None, help="Certificate folder (default ~/.local/state/cryptogen/dealer)."),
    out: str = typer.Option(".", help="Folder for the two parties' connection files."),
    step_ahead_mib: int = typer.Option(64, help="After each decode step, make up to this many MiB of each kind "
                                                "of the next step's items between the steps (both parties hold "
                                                "them: more is faster and costs each party that memory)."),
):
    """Run a dealer of correlated randomness (a third party trusted by both sides, on its own machine)."""
    # --step-ahead-mib's 64 is provider_remote.DEFAULT_STEP_AHEAD (not imported here: the CLI starts
    # without numpy; tests/dealer/test_dealer.py checks they agree)
    def go():
        from pathlib import Path

        split_host_port("--listen", listen, "0.0.0.0:7870 (port 0: any free port)")
        state = state_dir or str(Path.home() / ".local" / "state" / "cryptogen" / "dealer")
        check_writable_dir("--state-dir", state)
        check_writable_dir("--out", out)
        if step_ahead_mib < 0:
            raise UsageError(f"--step-ahead-mib must be 0 or more, got {step_ahead_mib}")
        from .dealer.service import run_dealer
        try:
            run_dealer(listen, state, out, step_ahead_bytes=step_ahead_mib << 20)
        except ValueError as e:
            raise UsageError(str(e)) from None
    _run(go)


@app.command()
def init(
    out: str = typer.Option(..., help="New (or empty) folder for the checkpoint."),
    shape: str = typer.Option("gpt2", help="gpt2 (d=768, 12 layers, 12 heads, vocab 50257, 1024 positions) "
                                           "or gpt2-medium."),
    layers: Optional[int] = typer.Option(None, help="Override the shape's layer count (>= 1), for quick runs."),
    seed: int = typer.Option(0, help="Seed of the initialisation (>= 0)."),
    dtype: str = typer.Option("float32", help="float32 or float16."),
):
    """Write a GPT-2-shaped checkpoint with GPT-2's initialisation (random weights, for benchmarks)."""
    def go():
        from .init_checkpoint import DTYPES, SHAPES, shape_config, write, check_out

        check_choice("--shape", shape, SHAPES)
        check_choice("--dtype", dtype, DTYPES)
        if layers is not None:
            check_int("--layers", layers, 1, None)
        check_int("--seed", seed, 0, 2 ** 32 - 1)
        check_writable_dir("--out", out)
        check_out(out)
        cfg = shape_config(shape, layers)
        typer.echo(f"initialising {shape} (n_embd {cfg['n_embd']}, {cfg['n_layer']} layers, vocab "
                   f"{cfg['vocab_size']}) ...", err=True)
        folder = write(shape, out, layers, seed, dtype)
        typer.echo(f"saved {folder}")

    _run(go)


def _generate_plain(prompt, model_name, max_new_tokens, temperature, top_k, seed, ban_unk=None):
    from . import registry
    from .sampling import Sampler, SamplingConfig, ban_note, unk_bans

    check_generate_args(prompt, max_new_tokens, (temperature, top_k, seed))
    model, tok, folder = registry.load(model_name)
    ids = encode_prompt(tok, prompt, model.config.n_positions, max_new_tokens)
    bans = unk_bans(tok, folder.name, ban_unk)  # by folder name, as a server names its model
    sampler = Sampler(SamplingConfig(temperature, top_k, seed).with_bans(bans))
    stream = TokenStream(tok)
    sys.stdout.write(prompt)
    t0 = time.perf_counter()
    for token in model.generate(ids, max_new_tokens, sampler):
        stream.push(token)
    dt = time.perf_counter() - t0
    stream.close()
    typer.echo(f"[{max_new_tokens} tokens in {dt * 1000:.0f} ms, plaintext{ban_note(bans)}]", err=True)


@app.command()
def bench(
    model: str = typer.Option("wikitext2", help="Shipped model name or checkpoint folder (no tokenizer needed)."),
    gpt2_base_layers: Optional[int] = typer.Option(
        None, help="Instead of --model (>= 1): GPT-2-base shape (d=768, 12 heads, vocab 50257, context 1024), "
                          "random weights, this many layers."),
    contexts: Optional[str] = typer.Option(
        None, help="Context lengths, comma-separated (default: 64,128,256,512, capped to the model's context "
                   "minus --tokens)."),
    tokens: int = typer.Option(3, help="Decode tokens per point (>= 1; latency: their median)."),
    workers: str = typer.Option("1,2", help="Worker counts of the sweep; the smallest also runs the context table."),
    ray: bool = typer.Option(False, "--ray", help="Context table through a local server (its own process, Ray workers) instead of in-process."),
    sweep_backend: str = typer.Option("ray", help="Worker sweep backend: ray (processes: real parallel speedup) "
                                                  "or inprocess (threads, GIL-bound; same counts), or none (no sweep)."),
    sweep_context: Optional[int] = typer.Option(
        None, help="Context of the worker sweep (>= 1; default: the largest context <= 128)."),
    recompute_max_context: int = typer.Option(
        128, help="Skip recompute (minutes per token) above this context (>= 0)."),
    max_minutes: float = typer.Option(240.0, help="Stop measuring after this long (the rest is marked skipped)."),
    grow: bool = typer.Option(True, help="In-process kv-reuse: grow one session's cache from context to context "
                                         "by chunked prefill (--no-grow: a fresh prefill per context)."),
    out: str = typer.Option("docs/bench/bench.json", help="JSON output; the .md table and PNG plots go beside it."),
    seed: int = typer.Option(0, help="Seed of the random prompt token ids (and --gpt2-base-layers weights)."),
    address: Optional[str] = typer.Option(None, help="Join a Ray cluster at HOST:PORT (default: embedded local)."),
):
    """Secure decode latency, bytes, HE ops and KV-cache size by context: kv-reuse vs recompute, and workers."""
    from .bench import BenchOptions, run, write_outputs

    def go():
        opts = BenchOptions(model=model, gpt2_base_layers=gpt2_base_layers, contexts=contexts, tokens=tokens,
                            workers=workers, ray=ray, sweep_backend=sweep_backend, sweep_context=sweep_context,
                            recompute_max_context=recompute_max_context, max_minutes=max_minutes, grow=grow,
                            out=out, seed=seed, address=address)
        report = run(opts)
        json_path, md_path, pngs, md = write_outputs(report, out)
        typer.echo(md)
        typer.echo(f"wrote {json_path}, {md_path}, {', '.join(str(p) for p in pngs)}", err=True)

    _run(go)


def main(argv: list[str] | None = None) -> None:
    """The ``cryptogen`` entry point; ``argv`` (default: the process's arguments) without the program
    name. Ends with SystemExit: 0, or 2 for bad input (one line on stderr, nothing started)."""
    app(args=argv, prog_name="cryptogen" if argv is not None else None)


if __name__ == "__main__":
    main()
