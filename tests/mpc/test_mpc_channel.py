import threading
import time

import numpy as np
import pytest

from cryptogen.mpc import (ChannelError, DealerProvider, FieldValueError, Party, ProviderError, RoleError,
                           ShapeError, channel_pair, mul_ss, open_, share, simulate)
from cryptogen.mpc.provider_he import HEProvider

from mpc_helpers import FP, run_pair

# A peer that is NOT told of a failure waits this long in its recv; every bound below is far
# shorter, so a test fails (quickly) when the telling is broken instead of passing after a wait.
PEER_TIMEOUT = 60.0
AT_ONCE = 2.0  # "at once": the peer's recv must fail within this many seconds of the failure


def _pair_run(fc, fs, pc=None, ps=None, roles=("client", "server")):
    outs, errs, _ = run_pair(fc, fs, pc, ps, roles, timeout=10)
    return outs, errs


def _in_thread(fn, join):
    """fn() in a daemon thread, waited for at most ``join`` s; returns what it raised (or None)."""
    box = {}

    def go():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            box["raised"] = e
    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(join)
    return box.get("raised")


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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runner", ["simulate", "run_pair"])
@pytest.mark.parametrize("failing", ["server", "client"])
def test_peer_failure_does_not_hang(failing, runner):
    """A failure on either side of a link aborts the peer at once (issue #13).

    One party raises after the handshake while the other is blocked in the recv of an opening;
    the channel's own timeout is PEER_TIMEOUT (60 s), and the blocked recv must fail within
    AT_ONCE (2 s) of the failure, with a ChannelError saying the peer failed. Both runners of two
    parties are checked: ``simulate`` (the library's) and tests/mpc's ``run_pair``.

    Mutations caught (each makes the peer wait its 60 s timeout, so this fails after ~2.5 s):
    - ``InMemoryChannel.abort`` a no-op (body replaced by ``pass``): all four cases fail;
    - ``party._run`` no longer aborting on an exception (``with abort_on_error(chan):`` replaced
      by ``if True:``): the two ``simulate`` cases fail;
    - ``mpc_helpers.run_pair`` not aborting on an exception: the two ``run_pair`` cases fail.
    The old test passed under all of these (it only checked the error types, after 10 s)."""
    log = {}

    def fn(p):
        if p.role == failing:
            time.sleep(0.3)  # the peer is blocked in its recv by now
            log["failed_at"] = time.monotonic()
            raise ValueError(f"{failing} failed")
        try:
            return open_(p, FP.encode(np.ones(2)))  # sends its share, then waits for the peer's
        except ChannelError as e:
            log["peer_error_at"], log["peer_error"] = time.monotonic(), e
            raise

    if runner == "simulate":
        raised = _in_thread(lambda: simulate(fn, timeout=PEER_TIMEOUT), join=0.3 + AT_ONCE + 0.5)
    else:
        _, errs, _ = run_pair(fn, fn, timeout=PEER_TIMEOUT, join=0.3 + AT_ONCE + 0.5)
    assert "failed_at" in log
    assert "peer_error_at" in log, (f"the peer's recv was still blocked {AT_ONCE + 0.5:.1f} s after the "
                                    f"{failing} failed (it waits for its {PEER_TIMEOUT:.0f} s timeout)")
    delay = log["peer_error_at"] - log["failed_at"]
    assert 0 <= delay < AT_ONCE, f"the peer's recv failed {delay:.2f} s after the failure"
    assert "peer failed" in str(log["peer_error"])
    if runner == "simulate":  # the caller sees the real failure, not the peer's ChannelError
        assert isinstance(raised, ValueError) and str(raised) == f"{failing} failed"
    else:
        fail_key, peer_key = (0, 1) if failing == "client" else (1, 0)
        assert isinstance(errs[fail_key], ValueError) and isinstance(errs[peer_key], ChannelError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("end", ["close", "abort"])
def test_close_or_abort_ends_the_peers_blocked_recv_at_once(end):
    """The peer's recv, blocked in another thread, fails within AT_ONCE of ``close()``/``abort()``
    on this end (channel timeout PEER_TIMEOUT), with the message for each ("closed" / "peer failed").

    Mutations caught: ``InMemoryChannel.close`` a no-op (the mutation of issue #13, which the old
    test_peer_failure_does_not_hang survived): the "close" case fails after ~2.5 s;
    ``InMemoryChannel.abort`` a no-op: the "abort" case fails."""
    a, b = channel_pair(timeout=PEER_TIMEOUT)
    log = {}

    def blocked():
        try:
            a.recv()
        except ChannelError as e:
            log["at"], log["err"] = time.monotonic(), e
    th = threading.Thread(target=blocked, daemon=True)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    getattr(b, end)()
    th.join(AT_ONCE + 0.5)
    assert "at" in log, f"recv still blocked {AT_ONCE + 0.5:.1f} s after the peer's {end}()"
    assert log["at"] - t0 < AT_ONCE
    assert ("closed" if end == "close" else "peer failed") in str(log["err"])
    if end == "abort":  # a failed link stays failed: every later recv fails too, without waiting
        t1 = time.monotonic()
        with pytest.raises(ChannelError, match="peer failed"):
            a.recv()
        assert time.monotonic() - t1 < AT_ONCE


@pytest.mark.timeout(60)
def test_abort_also_fails_a_recv_blocked_on_the_same_end():
    """``abort()`` from another thread wakes a recv blocked on the SAME end (as TLSChannel.abort
    does; ``pool.interrupt`` relies on it to stop a producer thread), and later sends fail.

    Mutation caught: ``InMemoryChannel.abort`` telling only the peer (the line
    ``self._inbox.put(self._aborted)`` removed): the own recv waits 60 s, this fails after ~2.5 s."""
    a, b = channel_pair(timeout=PEER_TIMEOUT)
    log = {}

    def blocked():
        try:
            a.recv()
        except ChannelError as e:
            log["at"] = time.monotonic()
    th = threading.Thread(target=blocked, daemon=True)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    a.abort()
    th.join(AT_ONCE + 0.5)
    assert "at" in log and log["at"] - t0 < AT_ONCE, "abort() did not wake this end's own blocked recv"
    with pytest.raises(ChannelError):
        a.send(np.ones(2, np.int64))


def test_shape_error_messages_have_no_share_values():
    xc, xs = share(FP.encode(np.array([1.5, 2.5, 3.5])))
    yc, ys = share(FP.encode(np.array([1.0, 2.0])))
    with pytest.raises(ShapeError) as ei:
        simulate(mul_ss, (xc, yc), (xs, ys), timeout=10)
    msg = str(ei.value)
    for v in np.concatenate([xc, xs, yc, ys]):
        assert str(int(v)) not in msg
