"""Per-call-site, per-position checks on every value ``open_`` reveals (cryptogen/mpc/arith.py).

Each protocol runs R times on a FIXED input A (fresh masks each time) and R times on a fixed input
B. A *call site* is the index of an opening in a run: the sequence of openings is a function of
public shapes only, so it is the same in every run (checked). For each call site:

* per position, run to run (``test_every_position_varies_between_runs``): a value the true protocol
  opens is x + r with a fresh uniform r, so R runs give R independent uniform values. The test fails
  if all R values of one position lie on an arc of length t/2^6 of Z_t: probability
  R 2^(-6(R-1)) = 16 * 2^-90 < 1e-25 per position (< 1e-19 over all positions here). Anything the
  input determines up to a spread < 2^36 -- a DReLU bit, a truncation input, a LayerNorm output, a
  softmax input, 2x -- is caught at every position it occupies.
* per call site, pooled over runs and positions (``test_every_call_site_is_uniform``): chi-square
  against the uniform distribution on Z_t (equal-width buckets, >= 10 expected per bucket);
  per-site level 1e-8 / sites: false alarm < 1e-8 per protocol.
* two inputs (``test_two_inputs_give_the_same_distribution``): per call site, a two-sample
  (homogeneity) chi-square between the openings of input A and of input B; same levels.
* masks used once (``test_no_mask_is_used_twice``): with d = (opened values of run 1) - (run 2),
  two openings that share a mask give equal (or, downstream of a truncation, nearly equal)
  entries of d. The number of neighbouring pairs of sorted d within 4 of each other is Poisson
  with mean <= n(n-1)5/t under the true protocol; the test fails at level 1e-8.
Overall false-alarm probability of this module: < 1e-6.
"""
import numpy as np
import pytest

from cryptogen.mpc import drelu, gelu, layernorm, share, simulate, softmax, trunc
from cryptogen.mpc.argmax import argmax_last
from cryptogen.mpc.arith import matmul_ss, mul_ss

from mpc_helpers import FP, T
from sec_helpers import (arc_false_alarm, concentrated_positions, homogeneity_pvalue, near_collision_mean,
                         near_collisions, poisson_sf, uniform_pvalue)

R = 16              # runs per input
ARC = T >> 6        # per-position concentration arc
ALPHA = 1e-8        # per protocol and check (Bonferroni over its call sites)
DELTA = 4           # near-equal differences for the mask-reuse check

_G, _B = np.linspace(0.5, 1.5, 16), np.linspace(-0.3, 0.3, 16)  # server-private LayerNorm weights


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, shape)
    x.flat[:3] = (0.0, 1e-3, -1e-3)  # exact zero and values next to it
    return x


CASES = {  # name -> (protocol(party, share, *server extras), input shape, server extras)
    "mul_trunc": (lambda p, a: trunc(p, mul_ss(p, a, a), 12), (48,), ()),
    "matmul_trunc": (lambda p, a: trunc(p, matmul_ss(p, a[:, :8], a[:, 8:].T), 12), (4, 16), ()),
    "drelu": (drelu, (48,), ()),
    "softmax": (lambda p, a: softmax(p, a, causal=True), (3, 16), ()),
    "layernorm": (lambda p, a, g=None, b=None: layernorm(p, a, g, b), (3, 16), (_G, _B)),
    # the wide path (GPT-2's outliers): two clips, a pre-truncation, two sums of squares
    "layernorm_wide": (lambda p, a, g=None, b=None: layernorm(p, a, g, b, x_range=4096.0), (3, 16), (_G, _B)),
    "gelu": (gelu, (24,), ()),
    "argmax": (lambda p, a: argmax_last(p, a), (3, 16), ()),  # token-only output (without its final opening)
}


def _runs(name, seed):
    fn, shape, extra = CASES[name]
    x = FP.encode(_inputs(shape, seed))
    runs = []
    for _ in range(R):
        xc, xs = share(x)
        st = {}
        simulate(fn, (xc,), (xs, *extra), stats=st, record=True)
        c_open, s_open = st["client"]["opened"], st["server"]["opened"]
        assert len(c_open) == len(s_open) and all(np.array_equal(a, b) for a, b in zip(c_open, s_open))
        runs.append([o.ravel() for o in c_open])
    return runs


@pytest.fixture(scope="module", params=list(CASES))
def openings(request):
    """{input: runs}, each run a list of opened vectors (call sites in order)."""
    out = {"A": _runs(request.param, 1), "B": _runs(request.param, 2)}
    shapes = {tuple(o.size for o in run) for runs in out.values() for run in runs}
    assert len(shapes) == 1, "the sequence of openings must depend on public shapes only"
    assert len(next(iter(shapes))) > 0
    return request.param, out


def _sites(runs):
    """Call site i -> (R, m_i) array of its openings."""
    return [np.stack([run[i] for run in runs]) for i in range(len(runs[0]))]


def test_every_position_varies_between_runs(openings):
    name, out = openings
    assert arc_false_alarm(R, T, ARC) < 1e-25
    for inp, runs in out.items():
        for i, site in enumerate(_sites(runs)):
            bad = np.flatnonzero(concentrated_positions(site, T, ARC))
            assert bad.size == 0, (f"{name}, input {inp}: opening #{i} (size {site.shape[1]}) takes "
                                   f"nearly the same value in all {R} runs at positions {bad[:8].tolist()}")


def test_every_call_site_is_uniform(openings):
    name, out = openings
    sites = _sites(out["A"])
    for i, site in enumerate(sites):
        p = uniform_pvalue(site, T)
        assert p > ALPHA / len(sites), f"{name}: opening #{i} (size {site.shape[1]}) is not uniform (p={p:.2e})"


def test_two_inputs_give_the_same_distribution(openings):
    name, out = openings
    sa, sb = _sites(out["A"]), _sites(out["B"])
    for i, (a, b) in enumerate(zip(sa, sb)):
        p = homogeneity_pvalue(a, b, T)
        assert p > ALPHA / len(sa), f"{name}: opening #{i} differs between two inputs (p={p:.2e})"


def test_no_mask_is_used_twice(openings):
    name, out = openings
    for inp, runs in out.items():
        d = np.mod(np.concatenate(runs[0]) - np.concatenate(runs[1]), T)
        k, lam = near_collisions(d, T, DELTA), near_collision_mean(d.size, T, DELTA)
        assert poisson_sf(k, lam) > ALPHA, (f"{name}, input {inp}: {k} pairs of openings move together "
                                            f"between runs (expected {lam:.2g}): a mask was reused")
