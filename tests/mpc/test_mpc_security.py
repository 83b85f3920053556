"""What each party sees: no peer shares or server weights in its transcript, no secret key on the
server, well-formed correlated randomness.

Uniformity of the opened values is checked per call site and per position (not pooled) in
tests/security/test_openings.py, end-to-end transcripts in tests/security/test_e2e_transcripts.py."""
import numpy as np
import pytest

from cryptogen.field import mul
from cryptogen.mpc import Dealer, gelu, layernorm, mul_ss, reconstruct, share, simulate, trunc
from cryptogen.mpc.arith import WIRE_BYTES, unpack_elements
from cryptogen.mpc.provider_he import HEProvider

from mpc_helpers import FP, T, make_provider


def _int_msgs(msgs):
    """Field elements received through open_ (packed (n, 6) uint8); drops handshake and ciphertexts."""
    return [unpack_elements(m, (m.shape[0],)) for m in msgs
            if m.dtype == np.uint8 and m.ndim == 2 and m.shape[1] == WIRE_BYTES]


@pytest.mark.parametrize("provider", ["dealer", pytest.param("he", marks=pytest.mark.he_provider)])
def test_transcripts_never_contain_peer_shares_or_server_weights(provider):
    rng = np.random.default_rng(7)
    d = 16
    x = rng.normal(0, 2, (2, d))
    g, b = rng.normal(1, 0.5, d), rng.normal(0, 0.5, d)
    xc, xs = share(FP.encode(x))

    def fn(p, a, gg=None, bb=None):
        return gelu(p, layernorm(p, a, gg, bb))

    st = {}
    simulate(fn, (xc,), (xs, g, b), provider=make_provider(provider), stats=st, record=True)
    secret_server = np.concatenate([xs.ravel(), FP.encode(g * np.sqrt(d), scale_bits=10), FP.encode(b)])
    got_client = np.concatenate([m.ravel() for m in _int_msgs(st["client"]["transcript"])])
    got_server = np.concatenate([m.ravel() for m in _int_msgs(st["server"]["transcript"])])
    assert not np.isin(got_client, secret_server.ravel()).any()
    assert not np.isin(got_server, xc.ravel()).any()
    # (whether an opening depends on x at all: tests/security/test_openings.py, per position)


def test_he_server_source_holds_no_secret_key():
    x = FP.encode(np.ones(5))
    xc, xs = share(x)
    (_, csrc), (_, ssrc) = simulate(lambda p, a: (mul_ss(p, a, a), p.cr), (xc,), (xs,),
                                    provider=HEProvider())
    assert not hasattr(ssrc, "keys")
    assert ssrc.engine.ctx.he.is_secret_key_empty()
    ssrc.engine.ctx.assert_public()
    assert not csrc.keys.he.is_secret_key_empty()


def test_dealer_bundles():
    dealer = Dealer()
    cb, sb = dealer.triples(10)
    a, b, c = (reconstruct(cb[k], sb[k]) for k in "abc")
    assert np.array_equal(c, mul(a, b, T))
    cb, sb = dealer.solved_bits(10)
    bits, r = reconstruct(cb["bits"], sb["bits"]), reconstruct(cb["r"], sb["r"])
    assert set(np.unique(bits)) <= {0, 1}
    assert np.array_equal((bits << np.arange(bits.shape[1])).sum(1), r) and np.all(r < T)


def test_he_solved_bits_are_bits_of_a_field_element():
    def fn(p):
        return p.cr.solved_bits((30,)), p.cr.counters()

    ((bc, rc), cnt), ((bs, rs), _) = simulate(fn, (), (), provider=HEProvider())
    bits, r = reconstruct(bc, bs), reconstruct(rc, rs)
    assert set(np.unique(bits)) <= {0, 1}
    assert np.array_equal((bits << np.arange(bits.shape[1])).sum(1), r) and np.all(r < T)
    assert cnt["provider"] == "he" and cnt["consumed"]["bits"] == 30
    assert cnt["produced"]["bits"] >= 30 and "triple" not in cnt["consumed"]  # all offline
    assert cnt["produced"]["triple"] >= cnt["consumed_offline"]["triple"] >= 30 * 42


def test_dealer_service_provider_matches_in_process_dealer():
    from cryptogen.mpc.provider import ServiceDealerProvider
    x = np.linspace(-4, 4, 50)
    xc, xs = share(FP.encode(x))
    st = {}
    c, s = simulate(lambda p, a: trunc(p, mul_ss(p, a, a), 12), (xc,), (xs,),
                    provider=ServiceDealerProvider(), stats=st)
    assert np.abs(FP.decode(reconstruct(c, s)) - FP.decode(FP.encode(x)) ** 2).max() < 1e-3
    assert st["client"]["randomness"]["consumed"] == st["server"]["randomness"]["consumed"]
