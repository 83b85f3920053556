"""Statistics for the security tests (no scipy here): chi-square, binomial and Poisson tails,
and the run-to-run / cross-position checks on values in Z_t.

Every test states its false-alarm probability under the true protocol; the thresholds below are
computed exactly from the null distributions (Bonferroni over the tests of one function)."""
from __future__ import annotations

import math
import struct

import numpy as np


def gammq(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series / Lentz continued fraction)."""
    if x <= 0:
        return 1.0
    lead = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        ap, term, s = a, 1.0 / a, 1.0 / a
        for _ in range(100000):
            ap += 1
            term *= x / ap
            s += term
            if abs(term) < abs(s) * 1e-16:
                break
        return max(0.0, 1.0 - s * math.exp(lead))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(lead) * h


def chi2_sf(x: float, df: int) -> float:
    return gammq(df / 2.0, x / 2.0)


def binom_sf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for j in range(k, min(n, k + 2000) + 1):
        lt = math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
        total += math.exp(lt)
    return min(1.0, total)


def poisson_sf(k: int, lam: float) -> float:
    """P(Poisson(lam) >= k)."""
    if k <= 0:
        return 1.0
    return max(0.0, 1.0 - sum(math.exp(-lam + j * math.log(lam) - math.lgamma(j + 1)) for j in range(k))) \
        if lam > 1e-3 else sum(math.exp(-lam + j * math.log(lam) - math.lgamma(j + 1)) for j in range(k, k + 40))


def signed(v, t: int) -> np.ndarray:
    v = np.mod(np.asarray(v, np.int64), t)
    return np.where(v > t // 2, v - t, v)


def bucket_counts(values, t: int, buckets: int) -> np.ndarray:
    idx = (np.asarray(values, np.float64) * buckets / t).astype(np.int64)
    return np.bincount(np.minimum(idx, buckets - 1), minlength=buckets)


def buckets_for(n: int, most: int = 64, per_bucket: int = 10) -> int:
    """Equal-width buckets over Z_t with >= per_bucket expected values each (at least 2)."""
    return int(max(2, min(most, n // per_bucket)))


def uniform_pvalue(values, t: int, buckets: int | None = None) -> float:
    """Chi-square goodness of fit of values to the uniform distribution on Z_t."""
    values = np.ravel(values)
    b = buckets or buckets_for(values.size)
    counts = bucket_counts(values, t, b)
    exp = values.size / b
    return chi2_sf(float(((counts - exp) ** 2 / exp).sum()), b - 1)


def homogeneity_pvalue(a, b, t: int, buckets: int | None = None) -> float:
    """Two-sample chi-square (2 x k contingency table): a and b have the same distribution on Z_t."""
    a, b = np.ravel(a), np.ravel(b)
    k = buckets or buckets_for(min(a.size, b.size))
    ca, cb = bucket_counts(a, t, k), bucket_counts(b, t, k)
    col = ca + cb
    keep = col > 0
    ea, eb = col * a.size / (a.size + b.size), col * b.size / (a.size + b.size)
    stat = float((((ca - ea) ** 2 / ea)[keep]).sum() + (((cb - eb) ** 2 / eb)[keep]).sum())
    return chi2_sf(stat, max(1, int(keep.sum()) - 1))


def concentrated_positions(samples: np.ndarray, t: int, arc: int) -> np.ndarray:
    """samples (R, m): for each position, whether all R values lie on one arc of length ``arc``
    of the circle Z_t. Under R independent uniform values: probability <= R (arc/t)^(R-1)."""
    s = np.sort(np.mod(samples, t), axis=0)
    gaps = np.diff(s, axis=0)
    wrap = s[0] + t - s[-1]
    biggest = np.maximum(gaps.max(axis=0) if len(s) > 1 else 0, wrap)
    return biggest >= t - arc


def arc_false_alarm(R: int, t: int, arc: int) -> float:
    return R * (arc / t) ** (R - 1)


def near_collisions(values, t: int, delta: int) -> int:
    """Number of neighbouring pairs (sorted, circular) at distance <= delta."""
    s = np.sort(np.mod(np.ravel(values), t))
    gaps = np.append(np.diff(s), s[0] + t - s[-1])
    return int((gaps <= delta).sum())


def near_collision_mean(n: int, t: int, delta: int) -> float:
    """Expected near_collisions of n independent uniform values (an upper bound: n(n-1)(delta+1)/t)."""
    return n * (n - 1) * (delta + 1) / t


def ct_words(ct):
    """RNS words (2, k, n) of a 2-polynomial SEAL ciphertext (the layout engine._flood uses)."""
    raw = ct.to_bytes("none")
    size, degree, k = struct.unpack_from("<QQQ", raw, 16 + 32 + 1)
    assert size == 2
    return np.frombuffer(raw[-size * k * degree * 8:], np.uint64).reshape(size, k, degree).astype(np.int64)
