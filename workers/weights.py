"""Server-side weight shards in the field: what one worker encodes, from its WorkerPlan.

The layers' weights are encoded at 2^(f + WEIGHT_EXTRA_BITS) (products land at 2^(2f + WEIGHT_EXTRA_BITS);
the embedding and the tied LM head at 2^f); biases at the product's scale are added to the server's
share of a product before truncation; the 1/sqrt(d_head) attention
scale is folded into W_q, b_q and W_k, b_k, d_head^(-1/4) each. Row-sharded layers (W_o, c_proj)
add their bias on the layer's lead worker only, so it is counted once. LayerNorm scales and biases stay
server-private floats and enter the 2PC LayerNorm as the server's own inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cryptogen import secure_plan as sp
from cryptogen.field import FixedPoint
from cryptogen.he.linear import pad_rows
from cryptogen.model import GPT


@dataclass
class LayerWeights:
    heads: tuple[int, ...]
    W: dict  # name -> field matrix (scale 2^f)
    b_qkv: np.ndarray
    b_o: np.ndarray | None
    b_fc1: np.ndarray
    b_fc2: np.ndarray | None
    ln: dict = field(default_factory=dict)  # "ln_1"/"ln_2" -> (gamma, beta) float64, lead only


@dataclass
class WorkerWeights:
    layers: dict  # layer -> LayerWeights
    wpe: np.ndarray | None  # (n_positions, d) field at 2^f, ends holder only
    ln_f: tuple | None
    ends: dict  # "embed{i}" / "head" -> field matrices

    def layer(self, layer: int) -> LayerWeights:
        return self.layers[layer]

    def encodable(self) -> dict:
        out = dict(self.ends)
        for l, lw in self.layers.items():
            out.update({f"{name}{l}": W for name, W in lw.W.items()})
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _ln(mod) -> tuple[np.ndarray, np.ndarray]:
    return _np(mod.weight), _np(mod.bias)


def model_weights(model: GPT, plan, fp: FixedPoint, holds_ends: bool, lead_layers=frozenset(),
                  embed_shards=(), head_cols=None) -> WorkerWeights:
    """``plan`` is this worker's WorkerPlan; ``lead_layers`` the layers it leads (residual, LN, biases);
    ``holds_ends``: positions and the final LN; ``embed_shards`` / ``head_cols``: its embedding row
    shards and LM-head vocabulary columns (``secure_plan.embed_owners`` / ``head_columns``)."""
    cfg, tr = model.config, model.transformer
    d, dh = cfg.n_embd, cfg.d_head
    fw = fp.frac_bits + sp.WEIGHT_EXTRA_BITS  # the layers' weights; their products and biases at 2^(f + fw)
    fb = fp.frac_bits + fw
    layers = {}
    for s in plan.shards:
        blk = tr.h[s.layer]
        lead = s.layer in lead_layers
        W_attn, b_attn = _np(blk.attn.c_attn.weight), _np(blk.attn.c_attn.bias)  # (d, 3d), (3d,)
        cols = [sec * d + h * dh + j for sec in range(3) for h in s.heads for j in range(dh)]
        # 1/sqrt(d_head) split evenly between the q and k parts: q.k is unchanged, and neither
        # matrix loses precision at 2^f (1/sqrt(1024) on W_q alone left GPT-2-init weights ~5 ulps)
        scale = np.ones(len(cols))
        scale[: 2 * len(s.heads) * dh] = dh ** -0.25
        rows_o = [h * dh + j for h in s.heads for j in range(dh)]
        lo, hi = s.ff_cols
        lw = LayerWeights(
            heads=s.heads,
            W={"qkv": fp.encode(W_attn[:, cols] * scale, fw), "o": fp.encode(_np(blk.attn.c_proj.weight)[rows_o], fw),
               "fc1": fp.encode(_np(blk.mlp.c_fc.weight)[:, lo:hi], fw),
               "fc2": fp.encode(_np(blk.mlp.c_proj.weight)[lo:hi], fw)},
            b_qkv=fp.encode(b_attn[cols] * scale, fb),
            b_o=fp.encode(_np(blk.attn.c_proj.bias), fb) if lead else None,
            b_fc1=fp.encode(_np(blk.mlp.c_fc.bias)[lo:hi], fb),
            b_fc2=fp.encode(_np(blk.mlp.c_proj.bias), fb) if lead else None,
        )
        if lead:
            lw.ln = {"ln_1": _ln(blk.ln_1), "ln_2": _ln(blk.ln_2)}
        layers[s.layer] = lw
    ends, wpe, ln_f = {}, None, None
    wte = _np(tr.wte.weight)  # (V, d)
    ends = _embedding_shards(cfg, wte, fp, embed_shards)
    if head_cols is not None:
        ends["head"] = fp.encode(wte[head_cols[0]:head_cols[1]].T)  # (d, its vocabulary columns)
    if holds_ends:
        wpe = fp.encode(_np(tr.wpe.weight))
        ln_f = _ln(tr.ln_f)
    return WorkerWeights(layers, wpe, ln_f, ends)


def _embedding_shards(cfg, wte: np.ndarray, fp: FixedPoint, which) -> dict:
    rows, bounds = sp.embed_rows(cfg.vocab_size, cfg.n_embd), sp.embed_shards(cfg)
    return {f"embed{i}": pad_rows(fp.encode(wte[bounds[i][0]:bounds[i][1]]), rows) for i in which}
