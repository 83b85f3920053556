"""Record a shipped model's real activations for the 2PC accuracy report.

    python scripts/dump_activations.py --model wikitext2 --out /tmp/acts_wikitext2.npz
    python scripts/report_mpc.py --activations /tmp/acts_wikitext2.npz --no-he

Keys: ``ln_in`` (rows entering every LayerNorm, incl. ln_f), ``scores`` (causal attention
score rows after 1/sqrt(d_head), masked entries dropped by taking the last row of each
window), ``gelu_in`` (c_fc outputs), plus ``ln_gamma``/``ln_beta`` of the first LayerNorm.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from cryptogen import registry
from cryptogen.data import first_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wikitext2")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default="/tmp/acts.npz")
    args = ap.parse_args()
    model, tok, _ = registry.load(args.model)
    ids = first_tokens(tok, args.model, args.tokens)
    ln_in, gelu_in, scores = [], [], []
    hooks = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            hooks.append(mod.register_forward_hook(lambda m, i, o: ln_in.append(i[0][0].detach().double().numpy())))
    for blk in model.transformer.h:
        hooks.append(blk.mlp.c_fc.register_forward_hook(lambda m, i, o: gelu_in.append(o[0].detach().double().numpy())))
        hooks.append(blk.attn.c_attn.register_forward_hook(lambda m, i, o, blk=blk: scores.append(_scores(o[0], blk.attn))))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    ln0 = model.transformer.h[0].ln_1
    np.savez(args.out, ln_in=np.concatenate(ln_in), gelu_in=np.concatenate(gelu_in).reshape(-1),
             scores=np.concatenate(scores), ln_gamma=ln0.weight.detach().double().numpy(),
             ln_beta=ln0.bias.detach().double().numpy())
    print(f"wrote {args.out}: LN rows {sum(len(x) for x in ln_in)}, |ln_in| max {max(np.abs(x).max() for x in ln_in):.1f}, "
          f"|scores| max {max(np.abs(x).max() for x in scores):.1f}, |gelu_in| max {max(np.abs(x).max() for x in gelu_in):.1f}")


def _scores(qkv: torch.Tensor, attn) -> np.ndarray:
    """Score rows of the last query of each 128-token window, per head: (rows, 128)."""
    T, C = qkv.shape
    q, k, _ = qkv.split(C // 3, dim=1)
    q = q.view(T, attn.n_head, attn.d_head).transpose(0, 1)
    k = k.view(T, attn.n_head, attn.d_head).transpose(0, 1)
    rows = []
    for end in range(128, T + 1, 128):
        s = (q[:, end - 1:end] @ k[:, end - 128:end].transpose(1, 2)) / math.sqrt(attn.d_head)
        rows.append(s[:, 0].detach().double().numpy())
    return np.concatenate(rows)


if __name__ == "__main__":
    main()
