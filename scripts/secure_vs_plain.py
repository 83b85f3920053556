"""Secure vs plaintext greedy generation on a shipped model (issue 5's acceptance check).

    python scripts/secure_vs_plain.py --model wikitext2 --tokens 32 --workers 2 --out docs/bench/secure_greedy.json

Prints a table (prompt, identical?, first differing position, max |logit diff|) and writes JSON.
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
from cryptogen.client.generate import SecureGenerator
from cryptogen.cluster.connect import shutdown

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
    ap.add_argument("--out", default="docs/bench/secure_greedy.json")
    args = ap.parse_args()
    model, tok, _ = registry.load(args.model)
    gen = SecureGenerator(model, workers=args.workers)
    rows = []
    try:
        for prompt in PROMPTS[: args.prompts]:
            ids = tok.encode(prompt).ids
            t0 = time.perf_counter()
            res = gen.generate(ids, args.tokens, keep_logits=True)
            secs = time.perf_counter() - t0
            ref = plain_greedy(model, ids, args.tokens)
            with torch.no_grad():
                full = model(torch.tensor([ids + res.tokens]))[0][0].numpy()
            diff = max(float(np.abs(lg - full[len(ids) - 1 + i]).max()) for i, lg in enumerate(res.logits))
            first = next((i for i, (a, b) in enumerate(zip(res.tokens, ref)) if a != b), None)
            rows.append(dict(prompt=prompt, prompt_tokens=len(ids), identical=res.tokens == ref,
                             first_difference=first, max_abs_logit_diff=diff, seconds=secs,
                             secure_text=tok.decode(res.tokens), plaintext_text=tok.decode(ref)))
            print(f"{rows[-1]['identical']!s:5}  diff {diff:.4f}  {secs:6.0f} s  {prompt!r} -> {rows[-1]['secure_text']!r}",
                  flush=True)
    finally:
        shutdown()
    meta = dict(model=args.model, tokens=args.tokens, workers=args.workers, machine=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d"), all_identical=all(r["identical"] for r in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"all identical: {meta['all_identical']}; wrote {args.out}")


if __name__ == "__main__":
    main()
