"""exp on x <= 0, reciprocal and reciprocal square root on shares (fixed point over Z_t).

All three are built from Beaver products, exact truncation and DReLU (``compare``); the
initial guesses of the Newton iterations come from a batch of comparisons against public
thresholds, turned into a guess by a PUBLIC linear combination of the shared bits (no
multiplication). The reciprocal follows the Newton–Raphson scheme of Catrina–Saxena (FC 2010)
and CrypTen (Knott et al., NeurIPS 2021); the exp follows the limit form (1 + x/m)^m used by
CrypTen, with a fourth-order Taylor base to cut the number of squarings.

exp_neg(x): x at scale 2^f, returns e^x at scale 2^20.
  1. clip x to [-16, 0] (two DReLU in one batch + one round); skipped if ``assume_nonpos``
     and x >= -16 is not required (then only the lower clip);
  2. z = x/16 in [-1, 0] (a change of scale, no work);
  3. z2 = z^2;  w = 1/2 + z/6 + z2/24 (public multiples, one truncation);
     p = 1 + z + z2 w  (the Taylor polynomial of degree 4);  4. e = p^16 (4 squarings).
  Error: |e^x - result| <= 3.5e-6 (approximation) + the truncations' ulps amplified by the
  squarings (x16); measured max 3.3e-5 over [-17, 0] (the cubic base with 5 squarings before:
  6.6e-6 and 6.3e-5). x < -16 returns e^-16 (error <= 1.2e-7).
  Cost: 8 (clip) + 1 + (1 + 7) + 7 + 5 x (1 + 7) = 64 rounds; 7 truncations + 1-2 DReLU per
  element (with the dealer's DCF keys, one round per truncation: 15 rounds).

reciprocal(x, lo, hi): 1/x for x in [lo, hi] (x clipped into that range), scales given.
  1. bits [x >= tau_j] for tau_j = lo * 2^(j/2) (one DReLU batch, 8 rounds);
  2. y0 = public combination of the bits: relative error |1 - x y0| <= 0.172;
  3. ``iters`` Newton steps y <- y (2 - x y) (2 products + 2 truncations each); after 3
     steps the relative error of the method is 0.172^8 < 1e-6; the fixed-point error is
     ~2 ulp at the output scale.
  Cost: 8 + 1 + iters x 16 rounds.

rsqrt_normalized(x): for x in [2^jlo, 2^jhi] returns (q, s) with 1/sqrt(x) = q * s,
  q = 1/sqrt(x / 2^j) in (0.70, 1] at scale 2^19 and s = 2^(-j/2) at scale 2^27, where
  2^j <= x < 2^(j+1). Splitting the value keeps the relative precision uniform over the
  whole range (a single fixed-point scale cannot hold 1/sqrt over 2^33 of range in 41 bits).
  1. bits b_j = [x >= 2^j] (one DReLU batch);  2. x' = sum_j ind_j * shift_j(x) in [1, 2)
  (all shifts truncated in one batch, one product round); s = public combination of bits;
  3. y0 = 1.215 - x'/4;  4. two Newton steps y <- y (3 - x' y^2) / 2.
  Relative error of q: <= 1e-5 (method) + ~3 ulp at 2^19.
"""
from __future__ import annotations

import math

import numpy as np

from ..field import add, neg, sub
from .arith import add_sp, mul_many, mul_sp, mul_ss, public
from .compare import drelu, ge_const, trunc
from .errors import RangeError

EXP_SCALE = 20
EXP_CLIP = 16.0
EXP_SQUARINGS = 4  # e^x = p(x / 2^4)^(2^4): |x / 16| <= 1 for the degree-4 Taylor base


def trunc_many(p, items):
    """Several truncations [(x, k), ...] in one protocol run (same rounds as one)."""
    xs = [np.asarray(x) for x, _ in items]
    ks = np.concatenate([np.full(x.size, k, np.int64) for x, (_, k) in zip(xs, items)])
    flat = trunc(p, np.concatenate([x.ravel() for x in xs]), ks)
    out, i = [], 0
    for x in xs:
        out.append(flat[i:i + x.size].reshape(x.shape))
        i += x.size
    return out


def clip_const(p, x, lo=None, hi=None, bits=None):
    """Clip shared x into [lo, hi] (public field constants at x's scale). One DReLU batch + 1 round."""
    consts = [c for c in (lo, hi) if c is not None]
    b = ge_const(p, x, consts) if bits is None else bits
    out = x
    for prod in mul_many(p, clip_pairs(p, x, lo, hi, b)):
        out = add(out, prod, p.t)
    return out


def clip_pairs(p, x, lo, hi, b):
    """The Beaver products whose sum clips x into [lo, hi] (either may be None), given the bits
    b = [x >= lo], [x >= hi] (in that order, for the bounds given): several clips of one x can then
    share one multiplication round."""
    pairs, i = [], 0
    if lo is not None:  # x < lo  ->  add (1 - b_lo)(lo - x)
        pairs.append((add_sp(p, neg(b[..., i], p.t), 1), add_sp(p, neg(x, p.t), lo)))
        i += 1
    if hi is not None:  # x >= hi ->  add b_hi (hi - x)
        pairs.append((b[..., i], add_sp(p, neg(x, p.t), hi)))
    return pairs


def exp_neg(p, x: np.ndarray, assume_nonpos: bool = False) -> np.ndarray:
    """e^x for x <= 0 at the interface scale 2^f; output at scale 2^20 (see module doc)."""
    f = p.fp.frac_bits
    lo = p.fp.encode(-EXP_CLIP)
    x = clip_const(p, x, lo=lo, hi=None if assume_nonpos else 0)
    z = mul_sp(p, x, 1 << (EXP_SCALE - f - EXP_SQUARINGS))  # x/16 at scale 2^20
    z2 = trunc(p, mul_ss(p, z, z), EXP_SCALE)
    w_raw = add(mul_sp(p, z, round(2 ** EXP_SCALE / 6)), mul_sp(p, z2, round(2 ** EXP_SCALE / 24)), p.t)
    w = trunc(p, add_sp(p, w_raw, 1 << (2 * EXP_SCALE - 1)), EXP_SCALE)  # |w_raw| < 2^40: in trunc's range
    s = trunc(p, mul_ss(p, z2, w), EXP_SCALE)
    e = add_sp(p, add(z, s, p.t), 1 << EXP_SCALE)
    for _ in range(EXP_SQUARINGS):
        e = trunc(p, mul_ss(p, e, e), EXP_SCALE)
    return e


def _bucket_combination(p, bits, values, scale):
    """sum_j ind_j * values[j] for ind_j = b_j - b_{j+1}, b_0 = 1: a public combination."""
    v = np.asarray(values, np.float64)
    coef = np.round(np.diff(v) * 2.0 ** scale).astype(np.int64)  # multiplies b_1 .. b_J
    acc = public(p, round(v[0] * 2 ** scale), bits.shape[:-1])
    return add(acc, np.mod(mul_sp(p, bits, coef).sum(-1), p.t), p.t)


def reciprocal(p, x, lo: float, hi: float, frac_in: int, frac_out: int, iters: int = 3):
    """1/x for x in [lo, hi] (x at scale 2^frac_in, clipped into range), output at 2^frac_out."""
    if not (0 < lo < hi) or frac_in + frac_out > 40 or (1.0 / lo) * 1.2 * 2 ** (2 * frac_out) >= 2 ** 41:
        raise RangeError("reciprocal: need 0 < lo < hi, frac_in + frac_out <= 40, 1.2/lo * 2^(2 frac_out) < 2^41")
    J = max(1, math.ceil(2 * math.log2(hi / lo)))
    taus = lo * (hi / lo) ** (np.arange(J + 1) / J)
    enc = np.array([round(tau * 2 ** frac_in) for tau in taus], np.int64)
    b = ge_const(p, x, enc)  # b[..., 0] = [x >= lo], b[..., J] = [x >= hi]
    x = clip_const(p, x, lo=enc[0], hi=enc[-1], bits=b[..., [0, J]])
    guesses = 2.0 / (taus[:-1] + taus[1:])
    y = _bucket_combination(p, b[..., 1:J], guesses, frac_out)
    two = 2 << frac_out
    for _ in range(iters):
        e = trunc(p, mul_ss(p, x, y), frac_in)
        y = trunc(p, mul_ss(p, y, add_sp(p, neg(e, p.t), two)), frac_out)
    return y


RSQ_Q = 19
RSQ_S = 27


def rsqrt_normalized(p, x, frac_in: int, jlo: int, jhi: int, iters: int = 2, extra=None,
                     s_scale: int = RSQ_S, coarse=None):
    """(q, s) with 1/sqrt(x) = q*s; x at scale 2^frac_in with 2^jlo <= x < 2^jhi.

    ``extra`` = (a, k): an independent product a*s truncated by k is computed in the same
    rounds as the first Newton step and returned third (saves a round trip in LayerNorm).
    ``coarse`` = (xc, frac_c, jsplit): the same value at a coarser scale 2^frac_c, which holds
    the whole range; buckets j >= jsplit are read from it (same rounds), and ``x`` need only be
    right where it is below 2^jsplit (LayerNorm's wide path: ``x`` saturates above).
    """
    jtop = jhi if coarse is None else coarse[2]
    if not (jlo < jhi and jtop - 1 + frac_in <= 40 and frac_in <= RSQ_Q and jlo + frac_in > 0):
        raise RangeError("rsqrt_normalized: unsupported range/scale")
    js = np.arange(jlo, jhi)
    if coarse is None:
        b = ge_const(p, x, np.array([1 << (j + frac_in) for j in js[1:]], np.int64))
        shifted = _shifts(p, x, js)
    else:
        b, shifted = _two_scale_buckets(p, x, frac_in, js, *coarse)
    ones = public(p, 1, b.shape[:-1] + (1,))
    ind = sub(np.concatenate([ones, b], -1), np.concatenate([b, 0 * ones], -1), p.t)
    xn = np.mod(mul_ss(p, ind, shifted).sum(-1), p.t)  # x / 2^j in [1, 2) at scale 2^frac_in
    s = _bucket_combination(p, b, 2.0 ** (-js / 2.0), s_scale)
    v = mul_sp(p, xn, 1 << (RSQ_Q - frac_in))            # x' at 2^19
    v4 = mul_sp(p, xn, 1 << (RSQ_Q - frac_in - 2))       # x'/4 at 2^19
    y = add_sp(p, neg(v4, p.t), round(1.215 * 2 ** RSQ_Q))
    res_extra = None
    for it in range(iters):
        if it == 0 and extra is not None:
            a, k = extra
            sb = np.broadcast_to(s[..., None], a.shape)
            yy, ax = mul_many(p, [(y, y), (a, sb)])
            y2, res_extra = trunc_many(p, [(yy, RSQ_Q), (ax, k)])
        else:
            y2 = trunc(p, mul_ss(p, y, y), RSQ_Q)
        vy2 = trunc(p, mul_ss(p, v, y2), RSQ_Q)
        y = trunc(p, mul_ss(p, y, add_sp(p, neg(vy2, p.t), 3 << RSQ_Q)), RSQ_Q + 1)
    return (y, s) if extra is None else (y, s, res_extra)


def _two_scale_buckets(p, x, frac_in, js, xc, frac_c, jsplit):
    """Bucket bits [x >= 2^j] (j = js[1:]) and the candidates x / 2^j at 2^frac_in, taken from
    ``x`` below ``jsplit`` and from ``xc`` (at 2^frac_c) from it on: one DReLU batch and one
    truncation batch, as ``_shifts`` alone."""
    if not (js[0] < jsplit <= js[-1] and js[-1] + frac_c <= 40):
        raise RangeError("rsqrt_normalized: unsupported coarse range/scale")
    lo, hi = js[js < jsplit], js[js >= jsplit]
    tf = [1 << int(j + frac_in) for j in lo[1:]]
    tc = [1 << int(j + frac_c) for j in hi]
    d = [add_sp(p, np.repeat(x[..., None], len(tf), -1), neg(np.array(tf, np.int64), p.t))] if tf else []
    d.append(add_sp(p, np.repeat(xc[..., None], len(tc), -1), neg(np.array(tc, np.int64), p.t)))
    b = drelu(p, np.concatenate(d, -1))
    # x / 2^j at 2^frac_in = xc / 2^(j - frac_in + frac_c) at xc's integer scale
    ks = [int(j) for j in lo if j > 0] + [int(j - frac_in + frac_c) for j in hi]
    srcs = [x] * sum(1 for j in lo if j > 0) + [xc] * len(hi)
    if min(ks[len(ks) - len(hi):]) < 1:
        raise RangeError("rsqrt_normalized: coarse scale too close to the fine one")
    exact = [mul_sp(p, x, 1 << int(-j))[..., None] for j in lo if j <= 0]
    stacked = np.stack(srcs, -1)
    cut = trunc(p, stacked, np.broadcast_to(np.array(ks, np.int64), stacked.shape))
    return b, np.concatenate(exact + [cut], -1)


def _shifts(p, x, js):
    """x / 2^j for every candidate j (last axis), at x's scale: truncations or exact doublings."""
    pos = [j for j in js if j > 0]
    out = [mul_sp(p, x, 1 << int(-j)) for j in js if j <= 0]
    if pos:
        rep = np.repeat(x[..., None], len(pos), -1)
        out.append(trunc(p, rep, np.broadcast_to(np.array(pos, np.int64), rep.shape)))
    return np.concatenate([o if o.ndim == x.ndim + 1 else o[..., None] for o in out], -1)


def rsqrt(p, x, frac_in: int, lo: float, hi: float, frac_out: int):
    """1/sqrt(x) for x in [lo, hi] (clipped into range) at scale 2^frac_in; output at 2^frac_out.

    The factor s = 2^(-j/2) is held at the largest scale for which q*s fits below 2^40, so the
    relative error grows with the range: about sqrt(hi/lo) * 2^-21 (1e-4 for hi/lo = 2^16).
    """
    jlo, jhi = math.floor(math.log2(lo)), math.floor(math.log2(hi)) + 1
    s_scale = math.floor(40 - RSQ_Q + jlo / 2.0)
    if s_scale < 1 or frac_out > RSQ_Q + s_scale or jlo + frac_in <= 0:
        raise RangeError("rsqrt: range too wide for the fixed-point scales")
    x = clip_const(p, x, lo=round(lo * 2 ** frac_in), hi=round(hi * 2 ** frac_in))
    q, s = rsqrt_normalized(p, x, frac_in, jlo, jhi, s_scale=s_scale)
    return trunc(p, mul_ss(p, q, s), RSQ_Q + s_scale - frac_out)
