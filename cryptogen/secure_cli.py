"""CLI glue for secure generation and secure evaluation (kept out of cli.py so the plaintext
commands start without importing Ray or Pyfhel)."""
from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import torch

from .scheduler.driver import MODES


@contextlib.contextmanager
def open_generator(model, workers: int, mode: str, address, provider: str, metrics_port=None):
    from .client.generate import SecureGenerator
    from .cluster.connect import shutdown
    from .scheduler.driver import DriverError

    if mode not in MODES:
        raise DriverError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    print(f"[starting Ray ({'embedded' if not address else address}), generating keys, "
          f"encoding weights on {workers} worker(s)...]", file=sys.stderr, flush=True)
    try:
        gen = SecureGenerator(model, workers=workers, mode=mode, address=address, provider=provider,
                              metrics_port=metrics_port)
        print(f"[ready in {time.perf_counter() - t0:.0f} s{gen.metrics_note()}]", file=sys.stderr, flush=True)
        yield gen
    finally:
        shutdown()


def progress_printer(max_new_tokens: int, mode: str):
    """A progress line on stderr: tokens so far, ms per token. When stdout is the same terminal,
    the streamed text is the progress (a rewritten status line would erase it); the closing
    summary still gives ms per token."""
    state = {"t0": time.perf_counter()}
    if sys.stdout.isatty() and sys.stderr.isatty():
        return None

    def on_step(timing, n_tokens):
        ms = 1000 * timing.seconds
        what = "prefill" if timing.phase == "prefill" else "decode"
        print(f"\r\x1b[2K[{n_tokens}/{max_new_tokens} tokens | {what} {ms:.0f} ms | {mode} | "
              f"{time.perf_counter() - state['t0']:.0f} s]", end="", file=sys.stderr, flush=True)
        if n_tokens >= max_new_tokens:
            print(file=sys.stderr, flush=True)

    return on_step


def secure_eval(model_name, data, split, data_dir, windows: int, window: int, workers, address, provider):
    """Secure perplexity on ``windows`` x ``window`` test tokens, beside plaintext on the same tokens."""
    from . import registry
    from .cli import UsageError
    from .data import data_path, load_text

    ds = data or (model_name if model_name in registry.SHIPPED else "wikitext2")
    data_path(ds, split, data_dir)
    model, tok, folder = registry.load(model_name)
    if window > model.config.n_positions:
        raise UsageError(f"--window {window} exceeds the model's context of {model.config.n_positions}")
    text = load_text(ds, split, data_dir)
    ids = np.asarray(tok.encode(text[: 400 * window * windows]).ids, np.int64)
    chunks = [ids[i * window:(i + 1) * window] for i in range(windows) if len(ids) >= (i + 1) * window]
    nll_secure = nll_plain = 0.0
    count = 0
    # the workers load their own copy; the plaintext model here is only for the comparison
    with open_generator(str(folder.resolve()), workers, "kv-reuse", address, provider) as gen:
        for w, chunk in enumerate(chunks):
            t0 = time.perf_counter()
            secure = gen.score(chunk.tolist(), on_step=lambda s, w=w: print(
                f"\r\x1b[2K[window {w + 1}/{len(chunks)}: {s.position + 1}/{window} tokens]",
                end="", file=sys.stderr, flush=True))
            with torch.no_grad():
                plain = model(torch.as_tensor(chunk[None]))[0][0].double().numpy()
            nll_secure += _nll(secure[:-1], chunk[1:])
            nll_plain += _nll(plain[:-1], chunk[1:])
            count += len(chunk) - 1
            print(f"\r\x1b[2K[window {w + 1}/{len(chunks)} done in {time.perf_counter() - t0:.0f} s]",
                  file=sys.stderr, flush=True)
    print(f"{folder.name} on {ds}/{split}, {len(chunks)} x {window} tokens ({count} predicted): "
          f"secure perplexity {np.exp(nll_secure / count):.3f}, plaintext {np.exp(nll_plain / count):.3f}")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())
