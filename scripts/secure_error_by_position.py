"""Secure vs plaintext logits, step by step, on a random GPT-2 shape of your choice (both parties in
one process, no Ray, one worker): the max logit error at each generated position, the plaintext's
top-2 margin there (a greedy token can flip where the margin is below the error), and where the
encrypted KV cache starts a new ciphertext (every n / d_head positions).

    .venv/bin/python scripts/secure_error_by_position.py --n-embd 512 --n-head 1 --prompt 29 --tokens 5

With ``--model NAME --window T`` (a shipped model): one secure scoring pass over the first T tokens
of its test split (logits at every position, as ``cryptogen eval --secure``), the max logit error
per position range (how the error grows with the context), and where the secure and the plaintext
greedy next token differ (with the plaintext's top-2 margin there).

    .venv/bin/python scripts/secure_error_by_position.py --model wikitext2 --window 140
    .venv/bin/python scripts/secure_error_by_position.py --model wikitext2 --window 512 --chunk 64
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--n-head", type=int, default=1)
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--n-inner", type=int, default=96, help="MLP width (small: cheap)")
    ap.add_argument("--vocab", type=int, default=101)
    ap.add_argument("--scale", type=float, default=2.0, help="multiplies every weight matrix (GPT-2 init x scale)")
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens (fixed ids)")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--model", help="a shipped model: score --window tokens of its test split instead")
    ap.add_argument("--window", type=int, default=140)
    ap.add_argument("--chunk", type=int, default=0,
                    help="with --model: score in passes of this many tokens, each attending to the encrypted cache "
                         "the earlier ones filled (bounds memory: a pass's softmax is chunk x context; 0: one pass)")
    ap.add_argument("--out", help="with --model: also write the report and every position's error to this JSON file")
    a = ap.parse_args()
    if a.chunk < 0:
        ap.error(f"--chunk must be 0 (one pass) or a positive number of tokens, got {a.chunk}")
    if a.model:
        return score_window(a.model, a.window, a.out, a.chunk)

    from cryptogen.driver import Driver
    from cryptogen.he.params import HEConfig
    from cryptogen.model import GPT, GPTConfig
    from cryptogen.plan import make_plan
    from cryptogen.scheduler.inprocess import InProcessRunner
    from cryptogen.secure_plan import head_groups, kv_layout

    cfg = GPTConfig(vocab_size=a.vocab, n_positions=max(64, a.prompt + a.tokens), n_embd=a.n_embd,
                    n_layer=a.n_layer, n_head=a.n_head, n_inner=a.n_inner)
    model = GPT.random(cfg, a.seed, a.scale)
    prompt = [(5 + 37 * i) % a.vocab for i in range(a.prompt)]
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, prompt)
    Driver(runner, cfg, plan).generate(len(prompt), a.tokens)
    tokens = runner.client.generated
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens]))[0][0].numpy()
    lo, hi = head_groups(cfg.n_head, cfg.d_head)[0]  # one worker: its first head group
    tpc = kv_layout(cfg, HEConfig().n, hi - lo).tpc
    rows = []
    for i, lg in enumerate(runner.client.logit_history):
        pos = len(prompt) - 1 + i
        ref = np.sort(full[pos])
        rows.append(dict(position=pos, kv_ciphertext=pos // tpc, max_error=round(float(np.abs(lg - full[pos]).max()), 4),
                         top2_margin=round(float(ref[-1] - ref[-2]), 4)))
    plain = list(model.generate(prompt, a.tokens, lambda logits: int(np.argmax(logits))))
    print(json.dumps(dict(shape=dict(n_embd=a.n_embd, n_head=a.n_head, d_head=cfg.d_head, n_layer=a.n_layer,
                                     n_inner=a.n_inner, vocab=a.vocab, scale=a.scale),
                          tokens_per_kv_ciphertext=tpc, same_greedy=plain == tokens,
                          steps=rows), indent=1))


def score_window(name: str, T: int, out: str | None = None, chunk: int = 0) -> None:
    from cryptogen import registry
    from cryptogen.data import first_tokens
    from cryptogen.driver import Driver
    from cryptogen.plan import make_plan
    from cryptogen.scheduler.inprocess import InProcessRunner

    model, tok, _ = registry.load(name)
    cfg = model.config
    ids = first_tokens(tok, name, T)
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, ids)
    driver = Driver(runner, cfg, plan)
    t0 = time.perf_counter()
    if chunk:  # passes of ``chunk`` tokens over the cache the earlier passes filled
        for start in range(0, len(ids), chunk):
            driver.forward(start, min(chunk, len(ids) - start), logits="all")
            print(f"[secure_error_by_position] tokens 0..{min(start + chunk, len(ids)) - 1} scored, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    else:
        driver.score(len(ids))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0][0].double().numpy()
    secure = np.stack(runner.client.logit_history)[:len(ids)]
    err = np.abs(secure - full).max(-1)
    top2 = np.sort(full, -1)[:, -2:]
    differ = np.flatnonzero(secure.argmax(-1) != full.argmax(-1))  # greedy next token differs here
    edges = [0, 10, 32, 64, 100, 128, 256, 384, 512, 1024]
    ranges = [(lo, min(hi, len(ids))) for lo, hi in zip(edges, edges[1:]) if lo < len(ids)]
    report = dict(model=name, tokens=len(ids), chunk=chunk or len(ids), seconds=round(seconds, 1),
                  max_error=round(float(err.max()), 4),
                  by_position={f"{lo}-{hi - 1}": round(float(err[lo:hi].max()), 4) for lo, hi in ranges},
                  greedy_same_at=f"{len(ids) - len(differ)}/{len(ids)}",
                  greedy_differs=[dict(position=int(i), max_error=round(float(err[i]), 4),
                                       top2_margin=round(float(top2[i, 1] - top2[i, 0]), 4)) for i in differ])
    print(json.dumps(report, indent=1))
    if out:
        Path(out).write_text(json.dumps(dict(report, command=" ".join(sys.argv), errors=[round(float(e), 4) for e in err]),
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
