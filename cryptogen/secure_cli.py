"""CLI glue for the secure commands: the client side of ``generate --secure`` / ``eval --secure``
(in the user's process, no Ray), and the programs of the other parties (``serve``, ``dealer``).
Kept out of cli.py so the plaintext commands start without importing Pyfhel.

``generate --secure`` with no ``--connect`` starts a local server: ``cryptogen serve`` in its own
OS process with its own embedded Ray, on loopback; this process is only the client and talks to
it over the same TLS links as to a remote server.
"""
from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from .cli_common import (TokenStream, UsageError, check_can_listen, check_eval_args, check_generate_args,
                         encode_prompt)


def _say(msg: str) -> None:
    print(f"[{msg}]", file=sys.stderr, flush=True)


def _is_remote(*connection_options) -> bool:
    """Any of --connect / --server / --server-cert / --api-key: a running server, not a local one."""
    return any(connection_options)


def _local_config(model):
    """(folder, config) of a local model, read without loading a weight."""
    from . import registry
    from .model import GPT

    folder = registry.checkpoint_folder(model)
    return folder, GPT.read_config(folder)


def _check_local_prompt(model, prompt, max_new_tokens) -> None:
    """For a local server: the prompt fits the model's context, found before the server starts."""
    from .tokenizer import load_tokenizer

    folder, cfg = _local_config(model)
    encode_prompt(load_tokenizer(folder), prompt, cfg.n_positions, max_new_tokens)


def _check_server_offers(conn, provider, logits: bool) -> None:
    """What the connected server offers, checked before the session (and the client's keys)."""
    if logits and not conn.server_opens_logits:
        raise UsageError("this server opens no logits (it runs with --token-only); use --reveal token, "
                         "or a server without --token-only")
    if provider == "dealer" and not conn.server_has_dealer:
        raise UsageError("this server has no dealer (its `cryptogen serve` ran without --dealer); "
                         "use --provider he")


@contextlib.contextmanager
def open_connection(connect_file, server, server_cert, api_key, model, workers, address, metrics_port=None,
                    dealer=None):
    """A client connection: to the given server, or to a local server started for this command."""
    from .client.local_server import LocalServer
    from .client.remote import connect

    remote = _is_remote(connect_file, server, server_cert, api_key)
    local = None
    t0 = time.perf_counter()
    try:
        if remote:
            conn = connect(connect_file, server=server, server_cert=server_cert, api_key=api_key,
                           metrics_port=metrics_port, dealer=dealer)
        else:
            from . import registry
            folder = registry.checkpoint_folder(model)  # one-line error before anything starts
            _say(f"starting a local server (its own process, embedded Ray, {workers} worker(s)) for {folder.name}")
            local = LocalServer(str(folder), workers=workers, address=address).start()
            conn = connect(local.connection_file, metrics_port=metrics_port, dealer=dealer)
        note = f"; metrics at {conn.exporter.url}" if conn.exporter is not None else ""
        _say(f"connected to {conn.model_name or 'the server'} at {conn.info.host}:{conn.info.port} (TLS, pinned) "
             f"in {time.perf_counter() - t0:.0f} s{note}")
        try:
            yield conn
        finally:
            conn.close()
    finally:
        if local is not None:
            local.stop()


def progress_printer(max_new_tokens: int, mode: str):
    """A progress line on stderr: tokens so far, ms per token. When stdout is the same terminal,
    the streamed text is the progress (a rewritten status line would erase it)."""
    state = {"t0": time.perf_counter(), "n": 0}
    if sys.stdout.isatty() and sys.stderr.isatty():
        return None

    def on_step(timing):
        state["n"] += 1
        what = "prefill" if timing.phase == "prefill" else "decode"
        print(f"\r\x1b[2K[{state['n']}/{max_new_tokens} tokens | {what} {1000 * timing.seconds:.0f} ms | {mode} | "
              f"{time.perf_counter() - state['t0']:.0f} s]", end="", file=sys.stderr, flush=True)
        if state["n"] >= max_new_tokens:
            print(file=sys.stderr, flush=True)

    return on_step


def generate_secure(prompt, model, max_new_tokens, sampling, workers, mode, address, provider, metrics_port,
                    connect_file=None, server=None, server_cert=None, api_key=None, dealer=None, ban_unk=None,
                    reveal="token"):
    """``cryptogen generate --secure``. ``sampling``: a SamplingConfig or (temperature, top_k, seed).
    Every argument is checked (UsageError, a ValueError) before a server is started or a key made;
    with a local server, the prompt is also encoded and checked against the context first."""
    from .sampling import ban_note, unk_bans

    sampling = check_generate_args(prompt, max_new_tokens, sampling, reveal=reveal, secure=True, workers=workers,
                                   mode=mode, provider=provider, dealer=dealer, metrics_port=metrics_port,
                                   address=address, connect_file=connect_file, server=server, server_cert=server_cert)
    if not _is_remote(connect_file, server, server_cert, api_key):
        _check_local_prompt(model, prompt, max_new_tokens)
    if metrics_port:
        check_can_listen("--metrics-port", "127.0.0.1", metrics_port)
    with open_connection(connect_file, server, server_cert, api_key, model, workers, address, metrics_port,
                         dealer) as conn:
        if conn.tokenizer is None:
            raise UsageError("the server sent no tokenizer, so a text prompt cannot be encoded")
        _check_server_offers(conn, provider, logits=reveal == "logits")
        ids = encode_prompt(conn.tokenizer, prompt, conn.cfg.n_positions, max_new_tokens)
        bans = unk_bans(conn.tokenizer, conn.model_name, ban_unk)  # the same mask as plaintext generation
        sampling = sampling.with_bans(bans)
        stream = TokenStream(conn.tokenizer)
        sys.stdout.write(prompt)
        sys.stdout.flush()
        timings = []
        on_step = progress_printer(max_new_tokens, mode)

        def step(t):
            timings.append(t)
            if on_step:
                on_step(t)
        for token in conn.generate(ids, max_new_tokens, sampling, mode=mode, provider=provider, on_step=step,
                                   reveal=reveal):
            stream.push(token)
        stream.close()
    dec = [t.seconds for t in timings if t.phase == "decode"]
    msg = f"secure {mode}, {len(conn.plan.workers)} worker(s), provider {provider}, reveal {reveal}: "
    if provider == "he":
        msg += (f"offline {conn.last_offline_s:.1f} s (correlated randomness for the request, made first); online "
                if conn.last_forecast else "randomness made on demand (first run of this model: calibrating the "
                                           "forecast, later runs make it before the request); ")
    msg += f"prefill {timings[0].seconds:.1f} s"
    if dec:
        msg += f", {1000 * sum(dec) / len(dec):.0f} ms per decoded token"
    between = sum(t.offline_s for t in timings)
    if between > 0.05:  # a remote dealer's items for the next step, waited for before it (not in the step)
        msg += f"; {between:.1f} s between the steps waiting for the dealer's items"
    _say(msg + ban_note(bans))


def secure_eval(model_name, data, split, data_dir, windows: int, window: int, workers, address, provider,
                connect_file=None, server=None, server_cert=None, api_key=None, dealer=None):
    """Secure perplexity on ``windows`` x ``window`` test tokens. Against a local server (the model
    is on this machine) it is printed beside plaintext on the same tokens; against a remote server
    (``--connect``) the weights are not the user's: secure only, with the server's tokenizer."""
    from . import registry
    from .data import data_path, first_tokens

    check_eval_args(windows=windows, window=window, workers=workers, address=address, provider=provider,
                    dealer=dealer, connect_file=connect_file, server=server, server_cert=server_cert)
    remote = _is_remote(connect_file, server, server_cert, api_key)
    ds = data or (model_name if model_name in registry.SHIPPED else "wikitext2")
    data_path(ds, split, data_dir)
    folder = None
    if not remote:  # the window against the model's context before the local server starts
        folder, cfg = _local_config(model_name)
        _check_window(window, cfg.n_positions)
    nll_secure = nll_plain = 0.0
    count = 0
    with open_connection(connect_file, server, server_cert, api_key, str(folder) if folder else model_name, workers,
                         address, dealer=dealer) as conn:
        if conn.tokenizer is None:
            raise UsageError("the server sent no tokenizer, so the test text cannot be encoded")
        _check_window(window, conn.cfg.n_positions)
        _check_server_offers(conn, provider, logits=True)
        model = None
        if folder is not None:
            from .model import GPT
            model = GPT.from_pretrained(folder).eval()
        ids = np.asarray(first_tokens(conn.tokenizer, ds, window * windows, split, data_dir), np.int64)
        chunks = [ids[i * window:(i + 1) * window] for i in range(windows) if len(ids) >= (i + 1) * window]
        if not chunks:
            raise UsageError(f"{ds}/{split} has only {len(ids)} tokens, fewer than one --window of {window}; "
                             "use a smaller --window")
        for w, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            print(f"\r\x1b[2K[window {w + 1}/{len(chunks)}: {window} tokens in one secure pass]", end="",
                  file=sys.stderr, flush=True)
            secure = conn.score(chunk.tolist(), provider=provider)
            nll_secure += _nll(secure[:-1], chunk[1:])
            if model is not None:
                import torch
                with torch.no_grad():
                    plain = model(torch.as_tensor(chunk[None]))[0][0].double().numpy()
                nll_plain += _nll(plain[:-1], chunk[1:])
            count += len(chunk) - 1
            print(f"\r\x1b[2K[window {w + 1}/{len(chunks)} done in {time.perf_counter() - t0:.0f} s]",
                  file=sys.stderr, flush=True)
        name = conn.model_name or model_name
    msg = (f"{name} on {ds}/{split}, {len(chunks)} x {window} tokens ({count} predicted): "
           f"secure perplexity {np.exp(nll_secure / count):.3f}")
    print(msg + (f", plaintext {np.exp(nll_plain / count):.3f}" if model is not None else ""))


def _check_window(window: int, n_positions: int) -> None:
    if window > n_positions:
        raise UsageError(f"--window {window} exceeds the model's context of {n_positions}; use --window "
                         f"{n_positions} or less")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())
