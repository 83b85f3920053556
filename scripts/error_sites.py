"""Which fixed-point rounding of the secure path costs the most logit accuracy? (docs/BENCHMARKS.md,
"Accuracy at long context")

A float64 forward of the model that rounds to 2^-bits at one site at a time, where the secure path
encodes or truncates (weights, LayerNorm outputs, q|k|v, scores, softmax probabilities, p.V, the
linear outputs), and prints the max |logit - float64 logit| per position range. It models rounding
only (round to nearest), not the 2PC approximations or the +-1.5-ulp truncations, so it is a lower
bound; on the 1024-wide head it predicted the secure errors within ~10 % (docs/BENCHMARKS.md).

    .venv/bin/python scripts/error_sites.py --model wikitext2 --window 509
    .venv/bin/python scripts/error_sites.py --n-embd 1024 --n-head 1 --prompt 18 --weight-bits 12 --probs-bits 12
    .venv/bin/python scripts/error_sites.py --checkpoint DIR --window 512   # e.g. from `cryptogen init`
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SITES = ["w_q", "w_k", "w_v", "w_o", "w_mlp", "wte_embed", "wte_head", "wpe",
         "ln", "qkv", "scores", "probs", "ctx", "attn_out", "fc1", "gelu", "fc2"]


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def forward(model, ids, sites: set, f: int = 12, weight_bits: int = 16, probs_bits: int = 18) -> np.ndarray:
    """Logits (T, V) in float64 with the roundings of ``sites`` (the layers' weight matrices at
    2^-weight_bits, the probabilities at 2^-probs_bits, the rest at 2^-f)."""
    cfg, sd = model.config, {k: v.double().numpy() for k, v in model.state_dict().items()}

    def r(x, site, bits=f):
        return np.round(x * 2.0 ** bits) / 2.0 ** bits if site in sites else x

    T, H, dh, C, eps = len(ids), cfg.n_head, cfg.d_head, cfg.n_embd, cfg.layer_norm_epsilon
    wte = sd["transformer.wte.weight"]
    x = r(wte, "wte_embed")[ids] + r(sd["transformer.wpe.weight"], "wpe")[:T]  # (T, C)
    causal = np.tril(np.ones((T, T), bool))
    for layer in range(cfg.n_layer):
        p = f"transformer.h.{layer}."
        h = r(_ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps), "ln")
        scale = np.concatenate([np.full(2 * C, dh ** -0.25), np.ones(C)])  # as workers/weights.py
        W = sd[p + "attn.c_attn.weight"] * scale
        W = np.concatenate([r(W[:, i * C:(i + 1) * C], f"w_{n}", weight_bits) for i, n in enumerate("qkv")], 1)
        qkv = r(h @ W + sd[p + "attn.c_attn.bias"] * scale, "qkv")
        q, k, v = (z.reshape(T, H, dh).transpose(1, 0, 2) for z in np.split(qkv, 3, -1))  # (H, T, dh)
        s = np.where(causal, r(q @ k.transpose(0, 2, 1), "scores"), -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        probs = r(e / e.sum(-1, keepdims=True), "probs", probs_bits)
        ctx = r((probs @ v).transpose(1, 0, 2).reshape(T, C), "ctx")
        x = x + r(ctx @ r(sd[p + "attn.c_proj.weight"], "w_o", weight_bits) + sd[p + "attn.c_proj.bias"], "attn_out")
        h = r(_ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps), "ln")
        a = r(h @ r(sd[p + "mlp.c_fc.weight"], "w_mlp", weight_bits) + sd[p + "mlp.c_fc.bias"], "fc1")
        g = r(0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3))), "gelu")
        x = x + r(g @ r(sd[p + "mlp.c_proj.weight"], "w_mlp", weight_bits) + sd[p + "mlp.c_proj.bias"], "fc2")
    h = r(_ln(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], eps), "ln")
    return h @ r(wte, "wte_head").T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a shipped model, scored on the first --window tokens of its test split")
    ap.add_argument("--checkpoint", help="a checkpoint folder (no tokenizer needed), on --window random token ids")
    ap.add_argument("--window", type=int, default=509)
    ap.add_argument("--n-embd", type=int, default=1024, help="else a random GPT-2 shape (as secure_error_by_position.py)")
    ap.add_argument("--n-head", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=18, help="tokens of the random shape's fixed prompt")
    ap.add_argument("--weight-bits", type=int, default=16, help="the layers' weight matrices' fractional bits (16: today's; 12: before)")
    ap.add_argument("--probs-bits", type=int, default=18, help="softmax output's fractional bits (18; 12 before)")
    ap.add_argument("--sites", help="comma-separated subset of the sites (default: each, then all)")
    a = ap.parse_args()
    from cryptogen.model import GPT, GPTConfig
    if a.model:
        from cryptogen import registry
        from cryptogen.data import first_tokens
        model, tok, _ = registry.load(a.model)
        ids = first_tokens(tok, a.model, a.window)
    elif a.checkpoint:
        model = GPT.from_pretrained(a.checkpoint)
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, a.window).tolist()
    else:
        cfg = GPTConfig(vocab_size=101, n_positions=max(64, a.prompt), n_embd=a.n_embd, n_layer=1,
                        n_head=a.n_head, n_inner=96)
        model = GPT.random(cfg, seed=3, weight_scale=2.0)
        ids = [(5 + 37 * i) % cfg.vocab_size for i in range(a.prompt)]
    model = model.double().eval()
    ref = forward(model, ids, set())
    edges = [e for e in (0, 16, 64, 128, 256, 512, 1024) if e < len(ids)] + [len(ids)]
    print(f"max |logit error| by position, layer weights at 2^-{a.weight_bits}, probabilities at 2^-{a.probs_bits}")
    print(f"{'site':10s}" + "".join(f"{f'{lo}-{hi - 1}':>10s}" for lo, hi in zip(edges, edges[1:])))
    for site in (a.sites.split(",") if a.sites else SITES + ["all"]):
        err = np.abs(forward(model, ids, set(SITES) if site == "all" else {site},
                             weight_bits=a.weight_bits, probs_bits=a.probs_bits) - ref).max(-1)
        print(f"{site:10s}" + "".join(f"{err[lo:hi].max():10.4f}" for lo, hi in zip(edges, edges[1:])))


if __name__ == "__main__":
    main()
