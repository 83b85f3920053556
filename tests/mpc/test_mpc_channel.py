import threading

import numpy as np
import pytest

from cryptogen.mpc import (ChannelError, DealerProvider, FieldValueError, Party, ProviderError, RoleError,
                           ShapeError, channel_pair, mul_ss, open_, share, simulate)
from cryptogen.mpc.provider_he import HEProvider

from mpc_helpers import FP


def _pair_run(fc, fs, pc=None, ps=None, roles=("client", "server")):
    cc, sc = channel_pair(timeout=10)
    errs, outs = {}, {}

    def go(role, chan, prov, f, key):
        try:
            p = Party(role, chan, prov)
            p.handshake()
            outs[key] = f(p)
        except Exception as e:  # noqa: BLE001
            errs[key] = e
            chan.close()

    shared = DealerProvider()
    ths = [threading.Thread(target=go, args=(roles[0], cc, pc or shared, fc, 0)),
           threading.Thread(target=go, args=(roles[1], sc, ps or shared, fs, 1))]
    [t.start() for t in ths]
    [t.join() for t in ths]
    return outs, errs


def test_open_counts_bytes_and_rounds():
    x = FP.encode(np.arange(10.0))
    xc, xs = share(x)
    st = {}
    c, s = simulate(open_, (xc,), (xs,), stats=st)
    assert np.array_equal(c, x) and np.array_equal(s, x)
    for role in ("client", "server"):
        on = st[role]["channel"]["online"]
        assert on == dict(bytes_sent=60, bytes_recv=60, msgs_sent=1, rounds=1)
    assert st["provider"] == "dealer"


def test_mul_counts_one_round_and_triples():
    xc, xs = share(FP.encode(np.ones(7)))
    st = {}
    simulate(mul_ss, (xc, xc), (xs, xs), stats=st)
    assert st["client"]["channel"]["online"]["rounds"] == 1
    assert st["client"]["channel"]["online"]["bytes_sent"] == 2 * 7 * 6
    assert st["client"]["randomness"]["consumed"] == {"triple": 7}


def test_both_claim_client_role():
    _, errs = _pair_run(lambda p: None, lambda p: None, pc=DealerProvider(), ps=DealerProvider(),
                        roles=("client", "client"))
    assert any(isinstance(e, RoleError) for e in errs.values())


def test_two_dealer_sessions_rejected():
    _, errs = _pair_run(lambda p: None, lambda p: None, pc=DealerProvider(), ps=DealerProvider())
    assert any(isinstance(e, ProviderError) for e in errs.values())


def test_unknown_role():
    cc, _ = channel_pair()
    with pytest.raises(RoleError):
        Party("dealer", cc, DealerProvider())


def test_provider_mismatch():
    _, errs = _pair_run(lambda p: None, lambda p: None, pc=DealerProvider(), ps=HEProvider())
    assert any(isinstance(e, ProviderError) for e in errs.values())


def test_shape_mismatch_between_parties():
    a, b = FP.encode(np.ones(3)), FP.encode(np.ones(4))
    with pytest.raises(ShapeError):
        simulate(mul_ss, (a, a), (b, b), timeout=10)


def test_shape_mismatch_local():
    with pytest.raises(ShapeError):
        simulate(mul_ss, (FP.encode(np.ones(3)), FP.encode(np.ones(4))),
                 (FP.encode(np.ones(3)), FP.encode(np.ones(4))), timeout=10)


def test_non_field_input_rejected_without_values_in_message():
    bad = np.array([123456789012, -5], np.int64)
    with pytest.raises(FieldValueError) as ei:
        simulate(open_, (bad,), (bad,), timeout=10)
    assert "123456789012" not in str(ei.value) and "-5" not in str(ei.value)


def test_peer_failure_does_not_hang():
    def fc(p):
        return open_(p, FP.encode(np.ones(2)))

    def fs(p):
        raise ValueError("server failed")

    outs, errs = _pair_run(fc, fs)
    assert isinstance(errs[0], ChannelError) and isinstance(errs[1], ValueError)


def test_shape_error_messages_have_no_share_values():
    xc, xs = share(FP.encode(np.array([1.5, 2.5, 3.5])))
    yc, ys = share(FP.encode(np.array([1.0, 2.0])))
    with pytest.raises(ShapeError) as ei:
        simulate(mul_ss, (xc, yc), (xs, ys), timeout=10)
    msg = str(ei.value)
    for v in np.concatenate([xc, xs, yc, ys]):
        assert str(int(v)) not in msg
