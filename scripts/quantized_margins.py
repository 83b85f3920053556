"""Does fixed-point rounding of the parameters alone change greedy decoding? (docs/RESULTS.md)

    python scripts/quantized_margins.py --model wikitext2 --tokens 32 --frac-bits 12

For each prompt of scripts/secure_vs_plain.py: greedy tokens of the float64 model and of the same
model with every parameter rounded to a multiple of 2^-f (what the secure path encodes), the
smallest plaintext top-2 logit margin and where it is, and the rounded model's margin there.
"""
from __future__ import annotations

import argparse
import copy

import torch

from cryptogen import registry
from secure_vs_plain import PROMPTS


def greedy_with_margins(model, ids, n):
    ids, margins = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0][0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids, margins


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wikitext2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--frac-bits", type=int, default=12)
    args = ap.parse_args()
    model, tok, _ = registry.load(args.model)
    model = model.double()
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(torch.round(p * 2 ** args.frac_bits) / 2 ** args.frac_bits)
    print("prompt | identical | smallest plaintext margin @ position | rounded model's margin there")
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        a, ma = greedy_with_margins(model, ids, args.tokens)
        b, mb = greedy_with_margins(rounded, ids, args.tokens)
        at = min(range(len(ma)), key=ma.__getitem__)
        print(f"{prompt!r} | {a == b} | {ma[at]:.5f} @ {at} | {mb[at]:.5f}")


if __name__ == "__main__":
    main()
