"""Exact truncation, secure comparison (DReLU) and selection over Z_t.

Constructions
-------------
Both protocols mask the shared value with a *solved-bits* random r (a uniform r in Z_t with
shared bits r_0..r_{L-1}, L = 42; Damgård–Fitzi–Kiltz–Nielsen–Toft, TCC 2006) and open
c = v + r mod t, which is uniform in Z_t (perfect hiding). What remains is the comparison
[c < r] between a PUBLIC c and a bit-shared r, done with the log-depth prefix circuit of
Nishide–Ohta (PKC 2007) / Catrina–de Hoogh (SCN 2010, "CarryOut"): per bit i
g_i = r_i (1 - c_i), e_i = 1 - (r_i XOR c_i) (both linear, c is public), then combine pairs
from the most significant end, (G, E)_hi o (G, E)_lo = (G_hi + E_hi G_lo, E_hi E_lo), with
Beaver multiplications of 0/1 values in Z_t. Everything is exact: no statistical slack is
needed, so the 42-bit field suffices (fails with probability 0).

gt_public(bits of r, c) -> [r > c]
  1. local g_i, e_i;  2. ceil(log2 L) = 6 levels, each one batched Beaver round.
  Cost: 6 rounds; 81 triples and 162 elements (972 bytes) sent per party per element (L = 42).

trunc(x, k) -> round(x / 2^k) + e, e in {-1, 0, 1}; result - x/2^k in [-1.5, 1.5] ulp.
  Input range: -2^41 <= x < 2^41 - 2^22 - 2^(k-1) (signed value; nearly the whole field).
  1. x' = x + B + 2^(k-1) with B = 2^41 (client adds): x' in [0, t) as an integer;
  2. open c = x' + r mod t (uniform); both learn c only;
  3. w = [c < r] (gt_public);  then x' = c - r + w t over the integers, so
     floor(x'/2^k) = c_h - r_h + w t_h + carry, carry = floor((c_l - r_l + w t_l)/2^k) in {-1,0,1}
     (subscripts h/l: high part / low k bits; r_h is a public combination of shared bits);
  4. output c_h - r_h + w t_h - B/2^k (the carry is the +-1 ulp error).
  Cost: 1 + 6 = 7 rounds, 81 triples + 1 solved-bits item per element;
  bytes per element per party: 6 (open) + 972 (tree) = 978.

drelu(x) -> [x >= 0] for the signed value of x, exact for EVERY field element
  (x >= 0 <=> 2x mod t is even, as t is odd; Nishide–Ohta's LSB trick):
  1. y = 2x mod t (local);  2. open c = y + r;  3. lsb(y) = c_0 XOR r_0 XOR [c < r]
  (y = c - r + t[c < r] and t is odd);  4. drelu = 1 - lsb(y).
  Cost: 1 + 6 + 1 = 8 rounds, 82 triples + 1 solved-bits item per element (990 bytes per party).

With a dealer (``Source.dcf``), [c < r] comes from the dealer's DCF key instead of the circuit
(``dcf.py``, BCG+21): evaluated locally on the public c, so trunc and drelu take ONE round
(the opening of c) and no triples; DReLU's key has a second output (1 - 2 r_0)[c < r], which
makes r_0 XOR [c < r] local too. A truncation's item (kind "tbits") has a key of one output.
Per element and party: 6 bytes online; offline r, its 42 bit shares and the key: 131 words
(truncation) or 174 (DReLU).
The dealer-free (HE) provider keeps the circuit above.

Who learns what: each party learns only c (uniform) and the Beaver openings (uniform).
"""
from __future__ import annotations

import numpy as np

from ..field import add, mul, mul_const, neg, sub
from . import dcf, pieces
from .arith import add_sp, mul_ss, open_
from .errors import RangeError

TRUNC_OFFSET_BITS = 41


def _public_bits(c: np.ndarray, L: int) -> np.ndarray:
    return ((c[..., None] >> np.arange(L)) & 1).astype(np.int64)


def gt_public(p, r_bits: np.ndarray, c: np.ndarray, want_eq: bool = False):
    """Shares of [r > c] (and of [r == c] if want_eq) for bit-shared r and public c."""
    L = r_bits.shape[-1]
    cb = _public_bits(np.asarray(c, np.int64), L)
    g = r_bits * (1 - cb)  # r_i (1 - c_i): c_i is public, so this is local
    e_c1 = r_bits
    e_c0 = add_sp(p, neg(r_bits, p.t), 1)
    e = np.where(cb == 1, e_c1, e_c0)
    # MSB first
    G, E = g[..., ::-1], e[..., ::-1]
    while G.shape[-1] > 1:
        G, E = _combine_level(p, G, E, want_eq)
    return (G[..., 0], E[..., 0]) if want_eq else G[..., 0]


def _combine_level(p, G, E, want_eq):
    m = G.shape[-1]
    h = m // 2
    Gh, Eh, Gl, El = G[..., 0:2 * h:2], E[..., 0:2 * h:2], G[..., 1:2 * h:2], E[..., 1:2 * h:2]
    last = (m == 2) and not want_eq
    if last:
        prod = mul_ss(p, Eh, Gl)
        nG, nE = add(Gh, prod, p.t), Eh  # E unused after the last level
    else:
        both = mul_ss(p, np.concatenate([Eh, Eh], -1), np.concatenate([Gl, El], -1))
        nG, nE = add(Gh, both[..., :h], p.t), both[..., h:]
    if m % 2:
        nG = np.concatenate([nG, G[..., -1:]], -1)
        nE = np.concatenate([nE, E[..., -1:]], -1)
    return nG, nE


def _mask_open(p, v, outputs: int = 2):
    """(r bits, r, c = v + r opened, DCF shares of (1, 1 - 2 r_0)[c < r] (outputs = 2: DReLU) or of
    [c < r] (outputs = 1: truncation), (..., outputs), or None without a dealer)."""
    if not p.cr.dcf:
        r_bits, r = p.cr.solved_bits(v.shape)
        return r_bits, r, open_(p, add(v, r, p.t)), None
    if v.size > pieces.MAX_ELEMENTS:  # the DCF keys of a long call, a piece at a time (mpc/pieces.py)
        parts = zip(*(_mask_open(p, piece, outputs) for piece in pieces.flat_pieces(v)))
        return tuple(np.concatenate(part).reshape(v.shape + part[0].shape[1:]) for part in parts)
    r_bits, r, key = p.cr.solved_bits_dcf(v.shape, outputs)
    c = open_(p, add(v, r, p.t))
    w = dcf.eval_(0 if p.is_client else 1, key, c.reshape(-1), p.cr.L, p.t)
    return r_bits, r, c, w.reshape(v.shape + (outputs,))


def high_part(bits: np.ndarray, k: np.ndarray, t: int) -> np.ndarray:
    """Shares of floor(r / 2^k) = sum_{i >= k} r_i 2^(i - k) from shares of r's bits (last axis, LSB
    first), k broadcast to bits.shape[:-1]: local. The C kernel (``_dcf.high``) where it is built."""
    bits = np.asarray(bits, np.int64)
    k = np.broadcast_to(np.asarray(k, np.int64), bits.shape[:-1])
    L = bits.shape[-1]
    kernel = dcf.high_kernel()
    if kernel is not None:
        out = np.empty(bits.shape[:-1], np.int64)
        kernel(out, np.ascontiguousarray(bits), np.ascontiguousarray(k), out.size, L, t)
        return out
    idx = np.arange(L)
    weights = np.where(idx >= k[..., None], np.int64(1) << np.maximum(idx - k[..., None], 0), 0)
    return np.mod(mul(bits, weights, t).sum(-1), t)  # L terms < t: no int64 overflow


def trunc(p, x: np.ndarray, k) -> np.ndarray:
    """Shares of round(x / 2^k) (error within +-1.5 ulp); k an int or an array broadcastable to x."""
    x = np.asarray(x, np.int64)
    k = np.broadcast_to(np.asarray(k, np.int64), x.shape)
    if k.size and (k.min() < 1 or k.max() > 40):
        raise RangeError("truncation amount k must be in [1, 40]")
    B = 1 << TRUNC_OFFSET_BITS
    xp = add_sp(p, x, B + (np.int64(1) << (k - 1)))
    r_bits, r, c, wk = _mask_open(p, xp, outputs=1)
    w = gt_public(p, r_bits, c) if wk is None else wk[..., 0]
    r_h = high_part(r_bits, k, p.t)
    t_h = np.int64(p.t) >> k
    res = sub(mul(w, t_h, p.t), r_h, p.t)
    return add_sp(p, res, (c >> k) - (np.int64(B) >> k))


def drelu(p, x: np.ndarray) -> np.ndarray:
    """Shares of the bit [x >= 0] (signed interpretation of x), exact."""
    x = np.asarray(x, np.int64)
    y = add(x, x, p.t)
    r_bits, r, c, wk = _mask_open(p, y)
    r0 = r_bits[..., 0]
    if wk is None:
        lt = gt_public(p, r_bits, c)
        v = sub(add(r0, lt, p.t), mul_const(mul_ss(p, r0, lt), 2, p.t), p.t)  # r0 XOR lt
    else:
        v = add(r0, wk[..., 1], p.t)  # r0 + (1 - 2 r0)[c < r] = r0 XOR [c < r], local
    lsb = np.where((c & 1) == 1, add_sp(p, neg(v, p.t), 1), v)
    return add_sp(p, neg(lsb, p.t), 1)


def ge_const(p, x: np.ndarray, consts) -> np.ndarray:
    """Bits [x >= c_j] for public field constants c_j (last axis j), all in one DReLU batch."""
    cs = np.mod(np.asarray(consts, np.int64), p.t)
    xs = add_sp(p, np.repeat(x[..., None], cs.shape[-1], -1), neg(cs, p.t))
    return drelu(p, xs)


def select(p, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """b ? x : y for a shared bit b (one Beaver round): y + b (x - y)."""
    return add(y, mul_ss(p, b, sub(x, y, p.t)), p.t)


def relu(p, x: np.ndarray) -> np.ndarray:
    """max(x, 0): one DReLU and one multiplication (no truncation)."""
    return mul_ss(p, drelu(p, x), x)

