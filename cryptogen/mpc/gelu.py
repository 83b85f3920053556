"""GPT-2's GELU (tanh form) on shares.

Construction (the ReLU-minus-bump split used by BOLT, Pang et al. S&P 2024, and Bumblebee,
Lu et al. NDSS 2025): GELU(x) = ReLU(x) - delta(|x|) with delta(y) = y - GELU(y) for y >= 0,
an even bump that is 0.17 at most and below 7.1e-5 for |x| >= 4. On |x| < 4 delta is a
degree-7 polynomial in u = |x|/4 fitted (least squares on Chebyshev nodes) to the tanh form
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); outside it is dropped.

gelu(x): x at scale 2^f, output at 2^f.
  1. one DReLU batch: b = [x >= 0], b_lo = [x >= -4], b_hi = [x >= 4]; in = b_lo - b_hi;
  2. one round: |x| = (2b - 1) x and ReLU(x) = b x (exact: bit times value);
  3. u = |x|/4 at 2^18 (change of scale); powers u^2..u^7 in 3 levels (products + truncations);
  4. poly = sum c_k u^k at 2^33 (public coefficients at 2^15, local);
  5. one round: in * poly (exact: bit times value); truncate to 2^f;  6. ReLU - that.
  Range: every x with |x| < 2^(40-f) (2^28 at f=12); out of [-4, 4] GELU is ReLU(x)
  (the polynomial's value there is multiplied by in = 0, so its overflow does not matter).
  Error: fit 2.1e-4 + tail 7.1e-5 + truncations (~1e-3 worst) + output rounding 1.2e-4 at f=12.
  Cost: 8 + 1 + 3 x 8 + 1 + 7 = 41 rounds by the comparison circuit, 10 with the dealer's
  DCF keys (``dcf.py``); per element 822 triples and 10 solved bits
  (~9.9 KB sent per party).
  Learned: nothing (uniform openings).
"""
from __future__ import annotations

import functools

import numpy as np

from ..field import add, mul_const, sub
from .arith import add_sp, mul_many, mul_sp, mul_ss
from .compare import ge_const, trunc
from .approx import trunc_many

GELU_T = 4.0
GELU_DEG = 7
U_SCALE = 18
C_SCALE = 15


def gelu_ref(x):
    """Plaintext tanh-form GELU (numpy float64), GPT-2's 'gelu_new'."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


@functools.lru_cache(maxsize=None)
def bump_coefficients(T: float = GELU_T, deg: int = GELU_DEG) -> tuple:
    """Least-squares fit of delta(T u) on u in [0, 1] (Chebyshev nodes), increasing powers."""
    k = np.arange(4000)
    u = (1 - np.cos(np.pi * (k + 0.5) / 4000)) / 2
    y = u * T
    target = y - gelu_ref(y)
    coef = np.linalg.lstsq(np.vander(u, deg + 1, increasing=True), target, rcond=None)[0]
    return tuple(float(c) for c in coef)


def gelu(p, x: np.ndarray) -> np.ndarray:
    """GPT-2 GELU of shared x at scale 2^f; output at 2^f (see module doc)."""
    x = np.asarray(x, np.int64)
    p.check(x)
    f = p.fp.frac_bits
    T = p.fp.encode(GELU_T)
    bits = ge_const(p, x, np.array([0, (-T) % p.t, T], np.int64))
    b, inside = bits[..., 0], sub(bits[..., 1], bits[..., 2], p.t)
    sign = add_sp(p, mul_const(b, 2, p.t), -1)
    absx, relu = mul_many(p, [(sign, x), (b, x)])
    u = mul_sp(p, absx, 1 << (U_SCALE - f - 2))  # |x|/4 at scale 2^18
    pw = _powers(p, u, GELU_DEG)
    coef = np.round(np.array(bump_coefficients()) * 2 ** C_SCALE).astype(np.int64)
    poly = add_sp(p, np.zeros_like(u), int(coef[0]) << U_SCALE)
    for k in range(1, GELU_DEG + 1):
        poly = add(poly, mul_sp(p, pw[k], int(coef[k])), p.t)
    bump = trunc(p, mul_ss(p, inside, poly), U_SCALE + C_SCALE - f)
    return sub(relu, bump, p.t)


def _powers(p, u, deg):
    """{k: u^k at scale 2^18} for k = 1..deg, in ceil(log2 deg) product levels."""
    pw = {1: u}
    while max(pw) < deg:
        top = max(pw)
        todo = [(k, top) for k in sorted(pw) if k + top <= deg and k + top not in pw]
        prods = mul_many(p, [(pw[a], pw[b]) for a, b in todo])
        outs = trunc_many(p, [(v, U_SCALE) for v in prods])
        for (a, b), v in zip(todo, outs):
            pw[a + b] = v
    return pw
