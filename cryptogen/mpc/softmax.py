"""Max over a vector and softmax (with max subtraction and an optional causal mask).

Construction: the usual secure-inference softmax (CrypTen, Knott et al. 2021; BOLT, Pang et
al. S&P 2024; the CryptoGen paper): subtract the row maximum (a tree of comparisons, so the
exponent is <= 0), exponentiate (``approx.exp_neg``), sum, multiply by a Newton reciprocal.

max_last(x, valid=None)   rows of x along the last axis; entries where the PUBLIC mask
  ``valid`` is False are ignored. Tree: ceil(log2 n) levels of max(a, b) = b + [a>=b](a - b).
  Exact (no error). Works for |x| < 2^39 at any scale. Cost: ceil(log2 n) x (8 + 1) rounds,
  n - 1 DReLU and n - 1 products per row. Learned: nothing (uniform openings only).

softmax(x, causal=False, mask=None, out_bits=f)   x at scale 2^f (scores), output at 2^out_bits.
  1. masked entries (public mask) are replaced by -2^(39-f) (a public constant, local);
  2. m = max_last(x);  d = x - m <= 0 (local);
  3. e = exp_neg(d) at 2^20 (clips d at -16: e^-16 = 1.1e-7 is the error for those entries);
  4. masked entries of e set to 0 (local; the mask is public);  S = sum e in [1, n] (local);
  5. y = 1/S by ``reciprocal`` over [1, n] at 2^20;  6. p = round(e * y / 2^(40 - out_bits)),
     masked entries set to exactly 0 (local).
  Causal mask (prefill): with x of shape (..., r, c), row i keeps columns j <= i + (c - r)
  (the last r query positions over c keys; r = c for a fresh prompt).
  Range: any |x| < 2^(39-f) (2^27 at f=12); no clipping is needed beyond step 3.
  Error (measured, docs/MPC.md): max abs <= 4.2e-4 at f=12 (output quantisation 1.2e-4 + 1.5 ulp
  truncation + exp/reciprocal error). Attention uses out_bits = f + 6 (``twoparty.PROBS_EXTRA_BITS``):
  at 2^12 a probability of a long row (~1/n) keeps only a few significant bits.
  Cost per row of n: 9 ceil(log2 n) (max tree) + 64 (exp) + 57 (reciprocal) + 8 rounds
  (210 for n = 512) by the comparison circuit; with the dealer's DCF keys (one-round
  comparisons and truncations, ``dcf.py``) 2 ceil(log2 n) + 31: 45 for n = 128, 49 for 512.
  Measured bytes in docs/MPC.md.
"""
from __future__ import annotations

import numpy as np

from ..field import add, sub
from .approx import EXP_SCALE, exp_neg, reciprocal
from .arith import mul_ss, public
from .compare import drelu, trunc
from .errors import ShapeError

MASK_BITS = 39


def causal_mask(rows: int, cols: int) -> np.ndarray:
    """valid[i, j] = j <= i + (cols - rows)."""
    if cols < rows:
        raise ShapeError("causal mask needs cols >= rows")
    return np.arange(cols)[None, :] <= np.arange(rows)[:, None] + (cols - rows)


def _apply_mask(p, x, valid):
    if valid is None:
        return x
    valid = np.broadcast_to(valid, x.shape)
    fill = public(p, -(1 << MASK_BITS), x.shape)
    return np.where(valid, x, fill)


def max_last(p, x: np.ndarray, valid=None) -> np.ndarray:
    """Shares of max over the last axis of x (entries with valid=False ignored)."""
    x = _apply_mask(p, np.asarray(x, np.int64), valid)
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:2 * h]
        diff = sub(a, b, p.t)
        m = add(b, mul_ss(p, drelu(p, diff), diff), p.t)
        x = np.concatenate([m, x[..., 2 * h:]], -1)
    return x[..., 0]


def softmax(p, x: np.ndarray, causal: bool = False, mask=None, out_bits: int | None = None) -> np.ndarray:
    """Row softmax of shared scores x at scale 2^f; output at 2^out_bits (default f; module doc)."""
    x = np.asarray(x, np.int64)
    p.check(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ShapeError("softmax needs at least one column")
    valid = _valid(x.shape, causal, mask)
    m = max_last(p, x, valid)
    d = sub(_apply_mask(p, x, valid), m[..., None], p.t)
    e = exp_neg(p, d, assume_nonpos=True)
    if valid is not None:
        e = np.where(np.broadcast_to(valid, e.shape), e, 0)
    s = np.mod(e.sum(-1), p.t)
    n = x.shape[-1]
    y = reciprocal(p, s, 1.0, float(max(n, 2)), EXP_SCALE, EXP_SCALE)
    prod = mul_ss(p, e, np.broadcast_to(y[..., None], e.shape))
    out_bits = p.fp.frac_bits if out_bits is None else out_bits
    if not 1 <= out_bits <= 2 * EXP_SCALE - 1:
        raise ShapeError(f"softmax output bits {out_bits} must be in [1, {2 * EXP_SCALE - 1}]")
    out = trunc(p, prod, 2 * EXP_SCALE - out_bits)
    return out if valid is None else np.where(np.broadcast_to(valid, out.shape), out, 0)


def _valid(shape, causal, mask):
    valid = None
    if causal:
        if len(shape) < 2:
            raise ShapeError("a causal mask needs scores of shape (..., rows, cols)")
        valid = causal_mask(shape[-2], shape[-1])
    if mask is not None:
        mask = np.asarray(mask, bool)
        try:
            np.broadcast_shapes(mask.shape, shape)
        except ValueError:
            raise ShapeError(f"mask shape {mask.shape} does not broadcast to {tuple(shape)}") from None
        valid = mask if valid is None else (valid & mask)
    if valid is not None and not np.all(np.broadcast_to(valid, shape).any(-1)):
        raise ShapeError("every row needs at least one unmasked entry")
    return valid
