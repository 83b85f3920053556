import numpy as np
import pytest

from cryptogen.field import matmul, mul, to_signed
from cryptogen.mpc import (DealerProvider, RangeError, drelu, matmul_ss, mul_ss, relu, reconstruct, select,
                           share, simulate, square_ss, trunc)

from mpc_helpers import FP, T, make_provider, make_rng

PROVIDERS = ["dealer", pytest.param("he", marks=pytest.mark.he_provider)]


def _field_run(fn, *xs, provider="dealer"):
    parts = [share(x) for x in xs]
    c, s = simulate(fn, [p[0] for p in parts], [p[1] for p in parts], provider=make_provider(provider))
    return reconstruct(c, s)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_mul_and_square_exact(provider):
    rng = make_rng()
    x, y = rng.integers(0, T, 50), rng.integers(0, T, 50)
    assert np.array_equal(_field_run(mul_ss, x, y, provider=provider), mul(x, y, T))
    assert np.array_equal(_field_run(square_ss, x, provider=provider), mul(x, x, T))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_matmul_exact(provider):
    rng = make_rng()
    X, Y = rng.integers(0, T, (3, 5)), rng.integers(0, T, (5, 2))
    assert np.array_equal(_field_run(matmul_ss, X, Y, provider=provider), matmul(X, Y, T))


@pytest.mark.parametrize("k", [1, 12, 20, 33])
def test_trunc_error_at_most_1_5_ulp_over_full_range(k):
    rng = make_rng()
    hi = (1 << 41) - (1 << 22) - (1 << (k - 1))  # documented range: -2^41 <= x < hi
    x = np.concatenate([rng.integers(-(1 << 41), hi, 3000),
                        [0, 1, -1, (1 << k) - 1, -(1 << k), hi - 1, -(1 << 41)]])
    out = to_signed(_field_run(lambda p, a: trunc(p, a, k), np.mod(x, T)), T)
    err = out - x / 2.0 ** k
    assert np.abs(err).max() <= 1.5


def test_trunc_per_element_amounts():
    ks = np.array([3, 12, 25, 40])
    x = np.array([12345, -(1 << 30), 1 << 39, -(1 << 40) + 7])
    out = to_signed(_field_run(lambda p, a: trunc(p, a, ks), np.mod(x, T)), T)
    assert np.abs(out - x / 2.0 ** ks).max() <= 1.5


def test_trunc_rejects_bad_amount():
    with pytest.raises(RangeError):
        _field_run(lambda p, a: trunc(p, a, 0), np.zeros(2, np.int64))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_drelu_exact_including_edges(provider):
    rng = make_rng()
    x = np.concatenate([rng.integers(0, T, 200), [0, 1, T - 1, T // 2, T // 2 + 1, (T - 1) // 2]])
    b = _field_run(drelu, x, provider=provider)
    assert np.array_equal(b, (to_signed(x, T) >= 0).astype(np.int64))


def test_relu_and_select():
    v = np.array([-3.5, 0.0, 2.25, -1e4, 1e4])
    out = FP.decode(_field_run(relu, FP.encode(v)))
    assert np.array_equal(out, np.maximum(v, 0))
    b = np.array([1, 0, 1, 0, 1])
    a2, b2 = FP.encode(v), FP.encode(-v)
    sel = FP.decode(_field_run(select, b, a2, b2))
    assert np.array_equal(sel, np.where(b == 1, v, -v))


@pytest.mark.parametrize("dcf,triples", [(True, 0), (False, 81)])
def test_preprocess_then_online_consumes_from_pool(dcf, triples):
    """With the dealer's DCF keys a truncation takes no triple, and a one-output key ("tbits"); by the
    circuit, 81 triples per element and plain solved bits."""
    prov = DealerProvider(dcf=dcf)
    x = FP.encode(np.linspace(-5, 5, 100))
    xc, xs = share(x)
    st = {}

    def fn(p, a):
        p.cr.preprocess(triples=20000, bits=200, tbits=200 if dcf else 0)
        before = dict(p.cr.produced)
        out = trunc(p, a, 12)
        return out, before, dict(p.cr.produced), dict(p.cr.consumed)

    (c, b0, b1, used), (s, *_) = simulate(fn, (xc,), (xs,), provider=prov, stats=st)
    assert b0 == b1  # nothing produced during the online phase
    assert used["tbits" if dcf else "bits"] == 100 and used.get("triple", 0) == 100 * triples
    assert used.get("bits" if dcf else "tbits", 0) == 0
    assert np.abs(FP.decode(reconstruct(c, s), 0) - np.linspace(-5, 5, 100)).max() < 2


def test_in_process_dealer_makes_in_batches(monkeypatch):
    """A large preprocess is made MAKE_BATCH items at a time (one 3.8 GB batch faulted its pages in
    each step); the items still line up between the parties: with batches of 7, 100 truncations over
    a pool of 15 batches equal float64 within 2 ulp and 100 DReLUs are exact."""
    from cryptogen.mpc import provider
    monkeypatch.setattr(provider, "MAKE_BATCH", 7)
    prov = DealerProvider()
    v = np.linspace(-5, 5, 100)
    x = FP.encode(v)

    def fn(p, a):
        p.cr.preprocess(bits=100, tbits=100)
        chunks = {k: [len(ch[0]) for ch in pool.chunks] for (k, _), pool in p.cr.pools.items() if pool.size}
        return trunc(p, a, 12), drelu(p, a), chunks

    (tc, dc, chunks), (ts, ds, _) = simulate(fn, *[(h,) for h in share(x)], provider=prov)
    assert chunks == {"bits": [7] * 14 + [2], "tbits": [7] * 14 + [2]}
    assert np.abs(FP.decode(reconstruct(tc, ts), 0) - v).max() < 2
    assert np.array_equal(reconstruct(dc, ds), (v >= 0).astype(np.int64))
