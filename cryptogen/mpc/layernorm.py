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
Numbers below for f = 12, eps = 1e-5. "utrunc" = ``compare.trunc`` with its input shifted by a
public constant so that it rounds without bias (``compare.trunc`` alone adds +1/2 ulp on
average, which summed over d squares was a 0.5%-of-S2 bias for sigma ~ 0.06, d = 128).
  1. mean at two scales, from m1 = sum(x) 2^(K-kd) = mean * rho at 2^(f+K) (d = 2^kd rho,
     exact if d <= 2^K, else one utrunc by kd - K), K <= 8 extra bits (K = 7 at d = 128,
     8 at d = 768; chosen so that step 4 fits, see _mean_plan). Then in ONE utrunc batch:
     coarse mu_c = m1 / (rho 2^K) at 2^f and fine mean m1 / rho at 2^(f+K), each a sum of
     products m1 c_j truncated by k_j (1/rho split into <= 11-bit chunks so that every product
     stays < 2^40.5; d a power of two needs one utrunc, d = 768 five); delta = mu_c 2^K - mean
     at 2^(f+K), |delta| < 3.3 coarse ulps. (Multiplying x by 2^K and truncating the mean
     once would not fit: |mean| < 256 at 2^(12+8) times a 20-bit 1/rho is 2^49.)
  2. z = x - mu_c at 2^f; clip z into [-R, R], R = min(256, sqrt(2^25.9/d), 2^(20.45-f))
     (2 DReLU + 1 round/elt);
  3. S2 = sum_i utrunc(z_i^2, 2f - sq) + d*eps at 2^sq, sq = min(17, floor(40.9 - log2(d R^2)))
     (17 at d = 128, 15 at d = 768; a product + utrunc/elt). z holds the coarse mean, so
     S2 = sum (x - mean)^2 + d delta^2: relative bias delta^2/sigma^2 (< 2e-5 at sigma = 0.06);
  4. (q, s) = rsqrt_normalized(S2): 1/sqrt(S2) = q s, s = 2^(-j/2) at 2^ss (ss = min(27, 39-f))
     for 2^j <= S2 < 2^(j+1); in the same rounds as the first Newton step, [z, delta] * s is
     truncated to 2^19 (delta as one extra column per row), and z' = z s + delta s =
     (x - mean) s at 2^19: the fine mean enters without any extra round;
  5. n' = utrunc(z' q) at 2^19 = (x - mean)/sqrt(S2) in [-1, 1];
  6. out = utrunc(n' * round(gamma sqrt(d) 2^10) / 2^17) + round(beta 2^f)
     (gamma sqrt(d) is the server's private Beaver input; beta is added by the server).
  Range: |mean| < 256, |x - mean| <= R (clipped there; beyond, the output saturates as if
  x_i - mean = +-R), |gamma| sqrt(d) < 4096, d <= 4096, d*eps >= 2^(1-sq). At f = 13, 14, R is
  capped at 2^(20.45-f) (175, 87) and s is held at 2^(39-f): the earlier version claimed
  R = 256 there but z^2 and z s then wrapped around the field (wrong outputs for
  |x - mean| > 181 at f = 13, and at f = 14 already for a dominant outlier at 60).
  Error: the protocol adds ~ 2^-(f+K) (J+2) / sigma |gamma| (mean; J = chunks),
  sqrt(d) / (4 d sigma^2 2^sq) + 1e-5 relative (S2 roundings, q), |n'| 2^-11 (gamma's
  encoding) and <= 1.5 ulp of output rounding + 0.5 ulp of beta: measured <= 5e-4 against the
  exact LayerNorm of the 2^-12-quantised input on the PTB/WikiText-2/LAMBADA activations
  (d = 128, sigma >= 0.05). Against the unquantised input the input rounding itself dominates:
  <= 2^-13 |gamma| / sigma (1.8e-3 for sigma = 0.059, |gamma| = 0.84) — measured max
  1.5e-3 .. 2.3e-3 on those activations (was 0.7e-2 .. 1.4e-2, dominated by the mean's
  +-1.5 ulp at 2^12 and the S2 bias).
  Wide path (``x_range`` R above the narrow r = 256; GPT-2's residual streams carry ~3000 in a
  few dimensions): step 2 clips z at R and at r in one DReLU batch and one round; step 3 makes
  two sums of squares: S2f = sum clip(z, r)^2 at 2^sq as above, exact whenever S2 < r^2 (then
  nothing was clipped at r), and S2c = sum utrunc(clip(z, R), pre)^2 at 2^sqc (pre = 4,
  sqc = 7 at d = 768, R = 4096, f = 12), which holds d R^2. rsqrt_normalized reads its
  buckets j < 2 log2 r and their x / 2^j from S2f, the rest from S2c (same rounds), so rows
  without outliers keep the narrow precision and outlier rows have S2 >= 2^16, where S2c's
  2^-7 ulp is a 2^-23 relative error. Measured against float64 on rows with +-3000 outliers,
  d = 128 and 768: <= 4.5e-4 (narrow path: 0.5 .. 7). Cost at d = 768: 118 rounds (+7, the
  pre-truncation) and 1.66x the bytes.
  Cost: 104 rounds if d <= 2^K (d = 128), else 111 (d = 768): mean 7 or 14 + 9 clip + 8 square
  + 8 bits + 8 shifts + 48 Newton + 8 + 8 (by the comparison circuit; with the dealer's DCF
  keys, ``dcf.py``, 24 / 25 rounds, 26 on the wide path). Per element unchanged (~500 triples, 6 solved bits,
  ~5.9 KB per party at d = 768); per row one more product (the delta column) and
  #chunks + [kd > K] + 1 truncations instead of 2: +12 B at d = 128 (2 truncations as before),
  +4.9 KB at d = 768 (7 truncations; 1x768: 4.435 MiB vs 4.431 MiB per party).
"""
from __future__ import annotations

import math

import numpy as np

from ..field import add, sub
from .approx import RSQ_Q, RSQ_S, clip_const, clip_pairs, rsqrt_normalized, trunc_many
from .arith import add_sp, input_server, mul_many, mul_sp, mul_ss
from .compare import ge_const, trunc
from .errors import RangeError, ShapeError

FINE_MAX = 8      # extra fractional bits of the fine mean (scale 2^(f+K), K <= FINE_MAX)
SQ_MAX = 17       # largest scale of the sum of squares (rsqrt_normalized computes x/4 at 2^19)
N_SCALE = RSQ_Q   # scale of n' = (x - mean)/sqrt(S2)
G_SCALE = 10      # scale of the server's gamma*sqrt(d)
BUDGET = 40.5     # log2 bound kept on every product that is truncated (trunc takes < 2^40.9)


def narrow_range(d: int, f: int) -> float:
    """The largest |x - mean| the narrow (default) path holds: squares of z at 2^(2f) fit."""
    return min(256.0, math.sqrt(2 ** 25.9 / d), 2 ** (20.45 - f))


def layernorm(p, x: np.ndarray, gamma=None, beta=None, eps: float = 1e-5, clip: bool = True,
              x_range: float = 256.0):
    """``x_range``: the PUBLIC bound on |x - mean| (both parties pass the same). Up to
    ``narrow_range`` (256 at f = 12, d <= 1455) the narrow path; above it the wide one (see the
    module docstring: z pre-truncated before squaring), up to 2^(28 - f)."""
    x = np.asarray(x, np.int64)
    p.check(x)
    d = x.shape[-1]
    if x.ndim < 1 or not 2 <= d <= 4096:
        raise ShapeError("layernorm needs a last axis of length 2..4096")
    f = p.fp.frac_bits
    R = narrow_range(d, f)
    sq = min(SQ_MAX, 2 * f - 1, math.floor(40.9 - math.log2(d * R * R)))
    jlo = math.floor(math.log2(max(d * eps, 2.0 ** -sq + 1e-12)))
    ss = min(RSQ_S, 39 - f)                             # scale of s: |z s| <= 1.42 at 2^(f+ss)
    K, plan = _mean_plan(d, f, jlo, ss)
    mu_c, delta = _mean(p, x, K, plan)                 # mean at 2^f; mu_c 2^K - mean at 2^(f+K)
    z = sub(x, mu_c[..., None], p.t)
    if x_range <= R:
        if clip:
            z = clip_const(p, z, lo=p.fp.encode(-R), hi=p.fp.encode(R))
        zz = _utrunc(p, mul_ss(p, z, z), 2 * f - sq)
        s2 = add_sp(p, np.mod(zz.sum(-1), p.t), max(1, round(d * eps * 2 ** sq)))
        jhi, coarse = math.ceil(math.log2(d * R * R)), None
    else:
        z, s2, jhi, coarse = _wide_sums(p, z, d, f, sq, R, float(x_range), eps)
    # (z + delta) s = (x - mean) s: the per-row delta rides as an extra column of the product
    # z s that rsqrt_normalized computes with its first Newton step (no extra round).
    a = np.concatenate([z, delta[..., None]], -1)
    ks = np.broadcast_to(np.array([f + ss - RSQ_Q] * d + [f + K + ss - RSQ_Q], np.int64),
                         a.shape).ravel()
    q, _, zs = rsqrt_normalized(p, s2, sq, jlo, jhi, extra=(a, ks), s_scale=ss, coarse=coarse)
    zs = add(zs[..., :d], zs[..., d:], p.t)            # (x - mean) s at 2^19
    n = _utrunc(p, mul_ss(p, zs, np.broadcast_to(q[..., None], zs.shape)), 2 * RSQ_Q - N_SCALE)
    return _affine(p, n, gamma, beta, d, f)


def _wide_sums(p, z, d, f, sq, r, R, eps):
    """The wide path's sums of squares (x_range R > the narrow r): z clipped at R and at r in one
    DReLU batch and one round; S2 fine = sum clip(z, r)^2 at 2^sq, right whenever S2 < r^2 (then
    nothing was clipped at r); S2 coarse = sum utrunc(clip(z, R), pre)^2 at 2^sqc, which holds
    d R^2. Returns (z clipped at R, S2 fine, jhi, the coarse input of rsqrt_normalized)."""
    if not R <= 2.0 ** (28 - f):
        raise RangeError(f"layernorm: x_range {R} above 2^{28 - f}")
    pre = max(1, f - math.floor(20.25 - math.log2(R)))  # |z / 2^pre| < 2^20.25 at 2^(f - pre)
    sqc = min(SQ_MAX, 2 * (f - pre) - 1, math.floor(40.9 - math.log2(d * R * R)))
    jsplit = math.floor(2 * math.log2(r))              # S2 < 2^jsplit <= r^2: S2 fine is exact
    consts = [p.fp.encode(c) for c in (-R, R, -r, r)]
    b = ge_const(p, z, consts)
    fix = mul_many(p, clip_pairs(p, z, *consts[:2], b[..., :2]) + clip_pairs(p, z, *consts[2:], b[..., 2:]))
    zR, zr = add(add(z, fix[0], p.t), fix[1], p.t), add(add(z, fix[2], p.t), fix[3], p.t)
    zc = _utrunc(p, zR, pre)
    q_r, q_c = mul_many(p, [(zr, zr), (zc, zc)])
    zz, zzc = trunc_many(p, [_utrunc_item(p, q_r, 2 * f - sq), _utrunc_item(p, q_c, 2 * (f - pre) - sqc)])
    s2 = add_sp(p, np.mod(zz.sum(-1), p.t), max(1, round(d * eps * 2 ** sq)))
    s2c = add_sp(p, np.mod(zzc.sum(-1), p.t), round(d * eps * 2 ** sqc))
    return zR, s2, math.ceil(math.log2(d * R * R)), (s2c, sqc, jsplit)


def _utrunc_item(p, x, k):
    """(x', k) such that trunc(x', k) is an unbiased (stochastic) rounding of x / 2^k.

    ``compare.trunc`` returns floor((x + 2^(k-1)) / 2^k) plus a carry that is 1 with
    probability ~ frac((x + 2^(k-1)) / 2^k): a stochastic rounding of x/2^k + 1/2 (bias
    +1/2 ulp, minus t_l/2^(k+1) with t_l = t mod 2^k from the wrap-around). Shifting the input
    by -2^(k-1) + floor(t_l/2) removes that bias (a residue of -2^-(k+1) ulp is left where
    t_l = 1, i.e. k <= 19); the error stays within +-1.5 ulp, mean ~0, std <= ~0.5 ulp.
    """
    k = np.asarray(k, np.int64)
    off = -(np.int64(1) << (k - 1)) + ((np.int64(p.t) & ((np.int64(1) << k) - 1)) >> 1)
    return add_sp(p, x, off), k


def _utrunc(p, x, k):
    return trunc(p, *_utrunc_item(p, x, k))


def _chunks(C: float, A: int):
    """Integers c_j, shifts k_j (1 <= k_j <= 40) with sum_j c_j 2^-k_j = C (0 < C < 1) to within
    2^-(A+3), each |c_j| <= 2^w, w = floor(40.5 - A): then |v c_j| < 2^40.5 for |v| < 2^A and
    sum_j round(v c_j / 2^k_j) = v C up to 1/8 ulp plus one rounding per chunk."""
    w = math.floor(BUDGET - A)
    out, resid = [], C
    while abs(resid) * 2.0 ** A > 2.0 ** -3:
        k = min(40, w - math.floor(math.log2(abs(resid))) - 1)
        last = k == 40 and abs(resid - round(resid * 2.0 ** k) / 2.0 ** k) * 2.0 ** A > 2.0 ** -3
        if k < 1 or w < 2 or last:
            raise RangeError("layernorm: mean scale too fine for the field")
        c = round(resid * 2 ** k)
        out.append((c, k))
        resid -= c / 2 ** k
    return out


def _mean_plan(d, f, jlo, ss):
    """Choose K and the truncations of the mean (all public, depends on d, f, eps only).

    m1 = sum(x) 2^(K - kd) = mean * rho at 2^(f+K), |m1| < 2^(9 + f + K) (|mean| < 256),
    fine mean = m1 / rho at 2^(f+K), coarse mean mu_c = m1 / (rho 2^K) at 2^f, both sums of
    chunk truncations done in ONE batch. delta = mu_c 2^K - fine mean is bounded by D coarse
    ulps; K is the largest value <= FINE_MAX with |delta| * s < 2^BUDGET at the scale of the
    product delta * s in rsqrt_normalized (s <= 2^(-jlo/2) at 2^ss).
    """
    kd = d.bit_length() - 1
    rho = d / 2 ** kd
    for K in range(FINE_MAX, 0, -1):
        A = 9 + f + K
        try:
            fine, coarse = (None, [(1, K)]) if rho == 1 else (_chunks(1 / rho, A),
                                                                _chunks(1 / (rho * 2 ** K), A))
        except RangeError:
            continue
        D = 1.5 * len(coarse) + 0.125 + (1.5 * (len(fine or ()) + 1) + 0.125) / 2 ** K
        if math.log2(D) + K + ss - jlo / 2 <= BUDGET:
            return K, dict(kd=kd, K=K, fine=fine, coarse=coarse)
    raise RangeError("layernorm: eps * d too small for the fixed-point scales")


def _mean(p, x, K, plan):
    """(mu_c at 2^f, delta = mu_c 2^K - mean at 2^(f+K)); 7 rounds if d <= 2^K, else 14."""
    kd, fine, coarse = plan["kd"], plan["fine"], plan["coarse"]
    s = np.mod(x.sum(-1), p.t)
    m1 = mul_sp(p, s, 1 << (K - kd)) if kd <= K else _utrunc(p, s, kd - K)
    items = [_utrunc_item(p, mul_sp(p, m1, c), k) for c, k in coarse]
    if fine is not None:
        items += [_utrunc_item(p, mul_sp(p, m1, c), k) for c, k in fine]
    parts = trunc_many(p, items)
    mu_c = np.mod(sum(parts[:len(coarse)]), p.t)
    mu_f = m1 if fine is None else np.mod(sum(parts[len(coarse):]), p.t)
    return mu_c, sub(mul_sp(p, mu_c, 1 << K), mu_f, p.t)


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
    out = _utrunc(p, mul_ss(p, n, np.broadcast_to(g, n.shape)), N_SCALE + G_SCALE - f)
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
