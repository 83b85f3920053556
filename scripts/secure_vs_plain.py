"""Secure vs plaintext greedy generation on a shipped model (issue 5's acceptance check).

    python scripts/secure_vs_plain.py --model wikitext2 --tokens 32 --workers 2 --out docs/bench/secure_greedy.json

Prints a table (prompt, identical?, first differing position, max |logit diff|, the closest call:
the position with the smallest plaintext top-2 logit margin and the secure margin between the same
two tokens there) and writes JSON. ``--only N --repeat K`` reruns one prompt K times (each run
draws fresh correlated randomness, so the fixed-point rounding differs).

The secure side is the real deployment: a local ``cryptogen serve`` (its own process, its own
embedded Ray, ``--workers`` worker actors; or joining ``--address``) and this process as its client
over TLS (``cryptogen.client.remote``), greedy decoding with the dealer-free ``he`` provider.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cryptogen import registry
from cryptogen.client.local_server import LocalServer
from cryptogen.client.remote import connect

PROMPTS = [
    "The history of the",
    "In the early years of the war , the",
    "The album was released in",
    "He was born in",
    "The game 's",
]


def plain_greedy(model, ids, n):
    return list(model.generate(ids, n, lambda logits: int(logits.argmax())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wikitext2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--only", type=int, default=None, help="run only prompt number N (1-based)")
    ap.add_argument("--repeat", type=int, default=1, help="run each prompt this many times (fresh randomness)")
    ap.add_argument("--address", default=None, help="the local server joins this Ray cluster (default: embedded)")
    ap.add_argument("--out", default="docs/bench/secure_greedy.json")
    args = ap.parse_args()
    model, tok, folder = registry.load(args.model)
    server = LocalServer(str(Path(folder).resolve()), workers=args.workers, address=args.address).start()
    rows = []
    try:
        with connect(server.connection_file) as conn:
            chosen = [PROMPTS[args.only - 1]] if args.only else PROMPTS[: args.prompts]
            for prompt in [p for p in chosen for _ in range(args.repeat)]:
                ids = tok.encode(prompt).ids
                t0 = time.perf_counter()
                tokens = list(conn.generate(ids, args.tokens, keep_logits=True, reveal="logits"))  # greedy
                logits = conn.last_logits  # the secure logits each token was picked from (this process only)
                secs = time.perf_counter() - t0
                ref = plain_greedy(model, ids, args.tokens)
                with torch.no_grad():
                    full = model(torch.tensor([ids + tokens]))[0][0].numpy()
                diff = max(float(np.abs(lg - full[len(ids) - 1 + i]).max()) for i, lg in enumerate(logits))
                first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
                # the closest call: plaintext top-2 margin (on the common prefix) and the secure margin there
                upto = len(logits) if first is None else first + 1
                top2 = [np.sort(full[len(ids) - 1 + i])[-2:] for i in range(upto)]
                at = int(np.argmin([b - a for a, b in top2]))
                order = np.argsort(full[len(ids) - 1 + at])[-2:][::-1]  # plaintext best, runner-up
                sec = logits[at]
                rows.append(dict(prompt=prompt, prompt_tokens=len(ids), identical=tokens == ref,
                                 first_difference=first, max_abs_logit_diff=diff, seconds=secs,
                                 closest_position=at, plaintext_margin=float(top2[at][1] - top2[at][0]),
                                 secure_margin=float(sec[order[0]] - sec[order[1]]),
                                 secure_text=tok.decode(tokens), plaintext_text=tok.decode(ref)))
                r = rows[-1]
                print(f"{r['identical']!s:5}  diff {diff:.4f}  closest call @{at}: plaintext margin "
                      f"{r['plaintext_margin']:.4f}, secure {r['secure_margin']:+.4f}  {secs:6.0f} s  {prompt!r} -> "
                      f"{r['secure_text']!r}", flush=True)
    finally:
        server.stop()
    meta = dict(model=args.model, tokens=args.tokens, workers=args.workers, provider="he", repeat=args.repeat,
                only=args.only, machine=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d"), all_identical=all(r["identical"] for r in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"all identical: {meta['all_identical']}; wrote {args.out}")


if __name__ == "__main__":
    main()
