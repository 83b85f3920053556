"""LayerNorm on shares, with the learned scale gamma and bias beta private to the SERVER.

Construction: mean by a public multiplication and truncation, variance by Beaver squares,
1/sqrt by the range-normalised Newton iteration of ``approx.rsqrt_normalized`` (the
normalisation follows the mantissa/exponent split of SecFloat-style and Catrina–Saxena
reciprocals), and gamma enters as a server-private input of a Beaver product (the client
holds 0 as its share of gamma): the client opens only d = n - a and e = gamma' - b, where b
is a triple element unknown to it, so e is uniform and the client learns NOTHING about gamma
or beta. beta is added by the server to its own share (local).

layernorm(x, gamma, beta): x (..., d) at scale 2^f; the server passes gamma, beta (float
arrays of length d, or None = 1 / 0); the client passes None for both. Output at 2^f.
  1. mu = round(round(sum x / 2^kd) * 2^20/rho / 2^20), d = 2^kd * rho (2 truncations/row);
  2. z = x - mu; clip z into [-R, R], R = min(256, sqrt(2^25.9/d)) (2 DReLU + 1 round/elt);
  3. S2 = sum_i round(z_i^2 / 2^9) + d*eps at scale 2^15 (a product + truncation/elt);
  4. (q, s) = rsqrt_normalized(S2): 1/sqrt(S2) = q s, with s = 2^(-j/2) for 2^j <= S2 < 2^(j+1);
     z' = round(z s) at 2^19 (done in the same rounds as the first Newton step);
  5. n' = round(z' q) at 2^19 = (x - mu)/sqrt(S2) in [-1, 1];
  6. out = round(n' * round(gamma sqrt(d) 2^10) / 2^17) + round(beta 2^f)
     (gamma sqrt(d) is the server's private Beaver input; beta is added by the server).
  Range: |mean| < 256, |x - mean| <= R (clipped there; beyond, the output saturates as if
  x_i - mean = +-R), |gamma| sqrt(d) < 4096, d <= 4096.
  Error: about 1.5 ulp per truncation: mean +-3.7e-4, z' and n' relative ~1e-5, so the output
  error is ~ (4e-4 / sigma) * |gamma| + 5e-4 (at f=12; sigma = row std of x).
  Cost: 111 rounds (14 mean + 9 clip + 8 square + 8 bits + 8 shifts + 48 Newton + 8 + 8);
  per element ~500 triples and 6 solved bits (~5.9 KB per party at d = 768).
"""
from __future__ import annotations

import math

import numpy as np

from ..field import add, sub
from .approx import RSQ_Q, RSQ_S, clip_const, rsqrt_normalized
from .arith import add_sp, input_server, mul_sp, mul_ss
from .compare import trunc
from .errors import RangeError, ShapeError

SQ_SCALE = 15
G_SCALE = 10


def layernorm(p, x: np.ndarray, gamma=None, beta=None, eps: float = 1e-5, clip: bool = True):
    x = np.asarray(x, np.int64)
    p.check(x)
    d = x.shape[-1]
    if x.ndim < 1 or not 2 <= d <= 4096:
        raise ShapeError("layernorm needs a last axis of length 2..4096")
    f = p.fp.frac_bits
    mu = _mean(p, x, d)
    z = sub(x, mu[..., None], p.t)
    R = min(256.0, math.sqrt(2 ** 25.9 / d))
    if clip:
        z = clip_const(p, z, lo=p.fp.encode(-R), hi=p.fp.encode(R))
    zz = trunc(p, mul_ss(p, z, z), 2 * f - SQ_SCALE)
    s2 = add_sp(p, np.mod(zz.sum(-1), p.t), max(1, round(d * eps * 2 ** SQ_SCALE)))
    jlo = math.floor(math.log2(max(d * eps, 2.0 ** -SQ_SCALE + 1e-12)))
    jhi = math.ceil(math.log2(d * R * R))
    q, s, zs = rsqrt_normalized(p, s2, SQ_SCALE, jlo, jhi, extra=(z, f + RSQ_S - RSQ_Q))
    n = trunc(p, mul_ss(p, zs, np.broadcast_to(q[..., None], zs.shape)), RSQ_Q)
    return _affine(p, n, gamma, beta, d, f)


def _mean(p, x, d):
    kd = d.bit_length() - 1
    rho = d / 2 ** kd  # in [1, 2)
    m1 = trunc(p, np.mod(x.sum(-1), p.t), kd) if kd else np.mod(x.sum(-1), p.t)
    return trunc(p, mul_sp(p, m1, round(2 ** 20 / rho)), 20)


def _affine(p, n, gamma, beta, d, f):
    """round(n * gamma) + beta with gamma, beta known to the server only."""
    if p.is_client:
        if gamma is not None or beta is not None:
            raise RangeError("gamma and beta are server-private: the client must pass None")
        g = input_server(p, None, shape=(d,))
    else:
        g_real = np.ones(d) if gamma is None else np.asarray(gamma, np.float64)
        if g_real.shape != (d,):
            raise ShapeError(f"gamma must have shape ({d},)")
        if np.abs(g_real).max() * math.sqrt(d) >= 4096:
            raise RangeError("|gamma| * sqrt(d) must stay below 4096")
        g = input_server(p, p.fp.encode(g_real * math.sqrt(d), scale_bits=G_SCALE))
    out = trunc(p, mul_ss(p, n, np.broadcast_to(g, n.shape)), RSQ_Q + G_SCALE - f)
    if not p.is_client and beta is not None:
        b = np.asarray(beta, np.float64)
        if b.shape != (d,):
            raise ShapeError(f"beta must have shape ({d},)")
        out = add(out, p.fp.encode(b), p.t)
    return out


def layernorm_ref(x, gamma=None, beta=None, eps=1e-5):
    import torch
    x = torch.as_tensor(np.asarray(x, np.float64))
    d = x.shape[-1]
    g = None if gamma is None else torch.as_tensor(np.asarray(gamma, np.float64))
    b = None if beta is None else torch.as_tensor(np.asarray(beta, np.float64))
    return torch.nn.functional.layer_norm(x, (d,), g, b, eps).numpy()
