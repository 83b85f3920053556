"""The stand-alone dealer over TLS (``cryptogen.dealer.service``) and the party's provider
(``cryptogen.mpc.provider_remote``): correctness, role binding, link pairing, bad input.
Fast, no Ray: the dealer runs in a background thread, the two parties in two threads."""
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cryptogen.dealer.service import DealerServer, run_dealer
from cryptogen.field import DEFAULT_T as T
from cryptogen.field import FixedPoint, matmul, mul
from cryptogen.mpc import Party, ProviderError, RoleError, channel_pair, matmul_ss, reconstruct, share, softmax, trunc
from cryptogen.mpc.provider_remote import HELLO_BYTES, MAGIC, RemoteDealerProvider, link_id
from cryptogen.net.channel import dial
from cryptogen.net.tls import new_secret

FP = FixedPoint()
F = FP.frac_bits


@pytest.fixture(scope="module")
def dealer(tmp_path_factory):
    d = tmp_path_factory.mktemp("dealer")
    srv = DealerServer("127.0.0.1:0", d / "state", d / "out", idle_timeout=60, record=True).start()
    yield srv
    srv.stop()


def providers(srv, link=None):
    link = link or link_id(new_secret())
    return RemoteDealerProvider(srv.client_file, link), RemoteDealerProvider(srv.server_file, link)


def run_pair(fn, cin, sin, pc, ps, timeout=60.0):
    """Like ``mpc.simulate``, but each party has its own provider (its own connection file)."""
    cc, sc = channel_pair(timeout=timeout)
    out, errs = {}, {}

    def go(role, chan, prov, inp):
        try:
            p = Party(role, chan, prov)
            try:
                p.handshake()
                out[role] = fn(p, *inp)
            finally:
                p.cr.close()
        except BaseException as e:  # noqa: BLE001
            errs[role] = e
            chan.close()
    ths = [threading.Thread(target=go, args=a) for a in
           (("client", cc, pc, cin), ("server", sc, ps, sin))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout + 30)
    if errs:
        raise next((e for e in errs.values() if not isinstance(e, RuntimeError)), list(errs.values())[0])
    return out["client"], out["server"]


def fetch_both(sc, ss, what):
    """Fetch the same thing from two sources in two threads (as the two parties would)."""
    res, errs = [None, None], []

    def go(i, s):
        try:
            res[i] = what(s)
        except BaseException as e:  # noqa: BLE001
            errs.append(e)
    ths = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate((sc, ss))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    if errs:
        raise errs[0]
    return res


def check_valid(res_c, res_s):
    (a, b, c), (A, B, C), (bits, r) = [[reconstruct(x, y) for x, y in zip(pc, ps)] for pc, ps in zip(res_c, res_s)]
    assert np.array_equal(mul(a, b, T), c)
    assert np.array_equal(matmul(A, B, T), C)
    assert set(np.unique(bits)) <= {0, 1}
    assert np.array_equal((bits << np.arange(bits.shape[-1])).sum(-1), r)
    assert len(np.unique(a)) > 0.99 * a.size  # fresh uniform values


def draw(s):
    return s.triples((3000,)), s.matrix_triple(6, 9, 4), s.solved_bits((50,))


# -- correctness -------------------------------------------------------------------------------
def test_trunc_softmax_matmul_match_plaintext(dealer):
    rng = np.random.default_rng(7)
    x = rng.normal(0, 20, 300)
    S = rng.normal(0, 6, (8, 32)).clip(-30, 30)
    X, Y = rng.normal(0, 1, (5, 12)), rng.normal(0, 1, (12, 3))
    enc = [FP.encode(x, 2 * F), FP.encode(S), FP.encode(X), FP.encode(Y)]
    shares = [share(v) for v in enc]

    def fn(p, xs, ss, Xs, Ys):
        return trunc(p, xs, F), softmax(p, ss, causal=True), trunc(p, matmul_ss(p, Xs, Ys), F)

    pc, ps = providers(dealer)
    assert pc.tag == ps.tag and pc.role == "client" and ps.role == "server"
    ps = pickle.loads(pickle.dumps(ps))  # providers travel to Ray worker actors
    assert ps.tag == pc.tag and ps.conn["key"] not in repr(ps)
    oc, os_ = run_pair(fn, [c for c, _ in shares], [s for _, s in shares], pc, ps)
    y_t, y_s, y_m = (FP.decode(reconstruct(c, s)) for c, s in zip(oc, os_))
    q = lambda v: FP.decode(FP.encode(v))  # noqa: E731 - what the protocol receives
    assert np.abs(y_t - FP.decode(FP.encode(x, 2 * F), 2 * F)).max() <= 1.5 / 2 ** F
    ref = np.exp(q(S) - np.where(np.tril(np.ones((8, 32), bool), 24), q(S), -np.inf).max(-1, keepdims=True))
    ref = np.where(np.tril(np.ones((8, 32), bool), 24), ref, 0)
    assert np.abs(y_s - ref / ref.sum(-1, keepdims=True)).max() < 1e-3
    assert np.abs(y_m - q(X) @ q(Y)).max() < 2 / 2 ** F


def test_halves_sum_to_valid_triples(dealer):
    pc, ps = providers(dealer)
    sc, ss = pc.source("client"), ps.source("server")
    try:
        check_valid(*fetch_both(sc, ss, draw))
    finally:
        sc.close(), ss.close()


def test_small_cap_chunks_requests_and_applies_back_pressure(tmp_path):
    with DealerServer("127.0.0.1:0", tmp_path, max_pending_bytes=64 << 10, idle_timeout=30) as srv:
        pc, ps = providers(srv)
        sc, ss = pc.source("client"), ps.source("server")
        res_c, res_s = fetch_both(sc, ss, draw)  # concurrently: one party's need is over the cap
        check_valid(res_c, res_s)
        assert sc.seq > 3  # 3000 triples (72 KB) do not fit one 64 KiB request
        sc.close(), ss.close()


# -- who can get what --------------------------------------------------------------------------
def test_role_is_bound_to_the_key(dealer):
    link = link_id(new_secret())
    with pytest.raises(RoleError, match="for the client role"):
        RemoteDealerProvider(dealer.client_file, link).source("server")
    with pytest.raises(RoleError, match="for the server role"):
        RemoteDealerProvider(dealer.server_file, link).source("client")
    # a client key presented as a server connection file: the dealer says whose key it is
    forged = dict(dealer.connection("client"), role="server")
    src = RemoteDealerProvider(forged, link).source("server")
    with pytest.raises(RoleError, match="the client role's"):
        src.triples((4,))
    forged = dict(dealer.connection("server"), role="client")
    with pytest.raises(RoleError, match="the server role's"):
        RemoteDealerProvider(forged, link).source("client").triples((4,))


def test_a_role_key_cannot_take_the_other_roles_halves(dealer):
    pc, ps = providers(dealer)
    sc, ss = pc.source("client"), ps.source("server")
    sc.triples((10,))  # the client made batch 0: the server's half waits on the dealer
    thief = RemoteDealerProvider(dealer.client_file, pc.link).source("client")
    with pytest.raises(ProviderError, match="already had a client end"):
        thief.triples((10,))
    ss.triples((10,))  # the real server still gets its half
    sc.close(), ss.close()


def test_wrong_key_is_refused(dealer):
    bad = dict(dealer.connection("client"), key=new_secret())
    with pytest.raises(ProviderError, match="wrong key"):
        RemoteDealerProvider(bad, link_id(new_secret())).source("client").triples((4,))


def test_another_link_id_gets_nothing_of_this_link(dealer):
    pc, ps = providers(dealer)
    other = RemoteDealerProvider(dealer.server_file, link_id(new_secret()))
    assert other.tag != pc.tag
    sc, ss, so = pc.source("client"), ps.source("server"), other.source("server")
    a1, b1, c1 = sc.triples((2000,))
    a3, b3, c3 = so.triples((2000,))  # same role key, other link: an unrelated batch
    a2, b2, c2 = ss.triples((2000,))
    assert np.array_equal(mul(reconstruct(a1, a2), reconstruct(b1, b2), T), reconstruct(c1, c2))
    assert not np.array_equal(mul(reconstruct(a1, a3), reconstruct(b1, b3), T), reconstruct(c1, c3))
    assert not np.any(a3 == a2)
    for s in (sc, ss, so):
        s.close()
    # and two parties naming different links fail the handshake before any protocol
    with pytest.raises(ProviderError, match="dealer session"):
        run_pair(lambda p, x: x, [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], pc, other)


def test_parties_asking_different_things_fail_the_link(dealer):
    pc, ps = providers(dealer)
    sc, ss = pc.source("client"), ps.source("server")
    sc.triples((10,))
    with pytest.raises(ProviderError, match="different correlated randomness"):
        ss.solved_bits((10,))
    sc.close()


# -- bad input ends only that connection -------------------------------------------------------
def _raw(srv, role=None, link=None):
    """A raw TLS connection to the dealer; with ``role``, already authenticated."""
    c = srv.connection(role or "client")
    host, port = srv.address.rsplit(":", 1)
    ch = dial(host, int(port), c["cert"], c["fingerprint"], what="the dealer")
    ch.timeout = 20
    if role:
        hello = MAGIC + bytes.fromhex(c["key"]) + bytes.fromhex(link or link_id(new_secret())) + T.to_bytes(8, "little")
        assert len(hello) == HELLO_BYTES
        ch.send(np.frombuffer(hello, np.uint8))
        assert ch.recv()[0] == 0
    return ch


def _expect_error(ch, match):
    status = ch.recv()
    assert status.tolist() == [1, 0]
    msg = ch.recv().tobytes().decode()
    assert match in msg, msg
    with pytest.raises(RuntimeError):  # then the dealer closes the connection
        ch.recv()
    ch.abort()
    return msg


def test_garbage_ends_only_that_connection(dealer):
    rng = np.random.default_rng(3)
    S = rng.normal(0, 6, (16, 64)).clip(-30, 30)
    sh = share(FP.encode(S))
    pc, ps = providers(dealer)
    result = {}
    honest = threading.Thread(target=lambda: result.setdefault("out", run_pair(
        lambda p, s: softmax(p, s), [sh[0]], [sh[1]], pc, ps)))
    honest.start()
    ch = _raw(dealer)
    ch.send_bytes(b"\x07\x00garbage")
    _expect_error(ch, "malformed message header")
    ch = _raw(dealer)
    ch.send(np.zeros(3, np.int64))
    _expect_error(ch, "malformed hello")
    ch = _raw(dealer, "client")
    ch.send_bytes(b"\x00\x01" + (1 << 40).to_bytes(8, "little"))  # an int64 frame of 2^40 items
    _expect_error(ch, "over this link's cap")
    for req, match in (([0, 7, 10, 0, 0, 0], "unknown kind"), ([0, 0, 1 << 40, 0, 0, 0], "over the dealer's cap"),
                       ([0, 2, 1, 1 << 20, 2, 2], "matrix dimensions"), ([5, 0, 10, 0, 0, 0], "out of order"),
                       ([0, 0, 0, 0, 0, 0], "count must be positive")):
        ch = _raw(dealer, "server")
        ch.send(np.array(req, np.int64))
        _expect_error(ch, match)
    honest.join(120)
    c, s = result["out"]
    ref = np.exp(FP.decode(FP.encode(S)))
    assert np.abs(FP.decode(reconstruct(c, s)) - ref / ref.sum(-1, keepdims=True)).max() < 1e-3
    deadline = time.time() + 10
    while dealer.stats()["connections"] and time.time() < deadline:
        time.sleep(0.05)
    assert dealer.stats()["connections"] == 0


def test_the_dealer_has_no_input_path(dealer):
    """Everything a party ever sends the dealer is a 76-byte hello or a 6-number request."""
    dealer.received.clear()
    pc, ps = providers(dealer)
    sh = share(FP.encode(np.linspace(-5, 5, 64).reshape(4, 16)))
    c, s = run_pair(lambda p, x: softmax(p, x), [sh[0]], [sh[1]], pc, ps)
    kinds = set(dealer.received)
    assert kinds <= {("|u1", (HELLO_BYTES,)), ("<i8", (6,))}, kinds
    assert dealer.received[("|u1", (HELLO_BYTES,))] == 2


def test_link_cap_and_forgetting(tmp_path):
    with DealerServer("127.0.0.1:0", tmp_path, max_links=1, idle_timeout=0.6) as srv:
        pc, ps = providers(srv)
        sc, ss = pc.source("client"), ps.source("server")
        sc.triples((4,))
        with pytest.raises(ProviderError, match="at most 1 links"):
            providers(srv)[0].source("client").triples((4,))
        ss.triples((4,))
        sc.close(), ss.close()
        deadline = time.time() + 10
        while srv.stats()["links"] and time.time() < deadline:
            time.sleep(0.05)
        assert srv.stats()["links"] == 0  # both ends closed: forgotten
        lonely = providers(srv)[0].source("client")
        lonely.triples((4,))  # the server end never comes: forgotten after the idle timeout
        deadline = time.time() + 10
        while srv.stats()["links"] and time.time() < deadline:
            time.sleep(0.05)
        assert srv.stats()["links"] == 0 and srv.stats()["pending_bytes"] == 0


# -- the program ------------------------------------------------------------------------------
def test_connection_files(dealer):
    for role in ("client", "server"):
        path = dealer.files[role]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = json.loads(path.read_text())
        assert set(c) == {"address", "cert", "fingerprint", "role", "key"} and c["role"] == role
        assert c["address"] == dealer.address and c["fingerprint"].startswith("sha256:") and len(c["key"]) == 64
    assert dealer.connection("client")["key"] != dealer.connection("server")["key"]


def test_run_dealer_bad_input(tmp_path):
    for listen in ("nonsense", "host:99999", ":7000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            run_dealer(listen, str(tmp_path), str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="output folder"):
        run_dealer("127.0.0.1:0", str(tmp_path / "state"), str(blocker / "out"))


def test_run_dealer_serves_until_sigterm(tmp_path):
    code = f"from cryptogen.dealer.service import run_dealer; run_dealer('127.0.0.1:0', {str(tmp_path)!r}, {str(tmp_path)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "dealer listening on 127.0.0.1:" in line and "dealer-client.json" in line and "dealer-server.json" in line
        link = link_id(new_secret())
        sc = RemoteDealerProvider(tmp_path / "dealer-client.json", link).source("client")
        sc.triples((8,))
        sc.close()
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_fetches_run_ahead_of_consumption_and_pair_up_whatever_the_timing(dealer):
    """Each party's fetches run in the background, ahead of its takes: WHAT is fetched follows from
    the takes alone, so two parties taking at different paces still send the dealer the same
    requests (no "different correlated randomness"), and every half pairs up into valid items. After
    a pause, the next takes up to what was taken before find their items already fetched."""
    pc, ps = providers(dealer)
    sc, ss = pc.source("client"), ps.source("server")

    def consume(s):
        rng = np.random.default_rng(0 if s.role == "client" else 1)  # different paces on the two sides
        out = []
        for _ in range(6):
            out.append(s.triples((5000,)))
            out.append(s.solved_bits((300,)))
            time.sleep(rng.uniform(0, 0.05))
        deadline = time.time() + 30
        while s._jobs and time.time() < deadline:  # the look-ahead lands during the pause
            time.sleep(0.02)
        short = s.short_takes
        out.append(s.triples((25000,)))
        return out, short, s.short_takes
    try:
        (oc, short_c, after_c), (os_, short_s, after_s) = fetch_both(sc, ss, consume)
        assert after_c == short_c and after_s == short_s  # 25,000 triples taken without waiting
        assert sc.asks == ss.asks and sc.asks["ahead"] > 0  # the same requests queued on both sides
        deadline = time.time() + 30
        while (sc._jobs or ss._jobs) and time.time() < deadline:  # a look-ahead may still be in flight
            time.sleep(0.02)
        assert sc.seq == ss.seq  # and, once both have sent them, the same number sent
        for (a, b, c), (a2, b2, c2) in zip(oc[0:13:2], os_[0:13:2]):
            assert np.array_equal(mul(reconstruct(a, a2), reconstruct(b, b2), T), reconstruct(c, c2))
        for (bits, r), (bits2, r2) in zip(oc[1:12:2], os_[1:12:2]):
            R = reconstruct(r, r2)
            assert np.array_equal((reconstruct(bits, bits2) << np.arange(bits.shape[-1])).sum(-1), R)
    finally:
        sc.close(), ss.close()


def test_without_look_ahead_every_fetch_is_on_demand(dealer):
    link = link_id(new_secret())
    pc = RemoteDealerProvider(dealer.client_file, link, ahead_bytes=0)
    ps = RemoteDealerProvider(dealer.server_file, link, ahead_bytes=0)
    sc, ss = pc.source("client"), ps.source("server")
    try:
        fetch_both(sc, ss, lambda s: [s.triples((5000,)) for _ in range(6)])
        assert sc.asks == ss.asks == {"need": sc.short_takes} and sc.short_takes >= 3
    finally:
        sc.close(), ss.close()


def test_preprocess_fills_both_pools_with_the_same_requests(dealer):
    """``preprocess`` asks for what is not yet asked for (not what has arrived), so two parties
    calling it alike send the same requests; the takes after it need no fetch."""
    pc, ps = providers(dealer)
    sc, ss = pc.source("client"), ps.source("server")
    try:
        fetch_both(sc, ss, lambda s: s.preprocess(triples=6000, bits=200))
        res = fetch_both(sc, ss, lambda s: (s.triples((6000,)), s.solved_bits((200,))))
        assert sc.short_takes == ss.short_takes == 0 and sc.asks == ss.asks and sc.asks["need"] == 2
        (a, b, c), (a2, b2, c2) = res[0][0], res[1][0]
        assert np.array_equal(mul(reconstruct(a, a2), reconstruct(b, b2), T), reconstruct(c, c2))
        (bits, r), (bits2, r2) = res[0][1], res[1][1]
        assert np.array_equal((reconstruct(bits, bits2) << np.arange(bits.shape[-1])).sum(-1), reconstruct(r, r2))
    finally:
        sc.close(), ss.close()


@pytest.fixture(scope="module")
def small_step_dealer(tmp_path_factory):
    """A dealer announcing a 3,000,000-byte step look-ahead (125,000 triples, 1728 solved bits)."""
    d = tmp_path_factory.mktemp("dealer3m")
    srv = DealerServer("127.0.0.1:0", d / "state", d / "out", idle_timeout=60, step_ahead_bytes=3_000_000).start()
    yield srv
    srv.stop()


def test_step_done_makes_the_next_decode_steps_items_between_the_steps(small_step_dealer):
    """After a decode step at position p both parties ask for what it took times 1.02 + 2 / (p + 1)
    (nothing after a prefill), at most the dealer's announced look-ahead in bytes of a kind;
    ``settle`` waits for it, so a next step that takes up to that needs no fetch. Both ends learn
    the same cap at the hello, send the same requests, and the halves pair up into valid items."""
    dealer = small_step_dealer
    link = link_id(new_secret())
    pc = RemoteDealerProvider(dealer.client_file, link, ahead_bytes=0)  # only the steps' asks
    ps = RemoteDealerProvider(dealer.server_file, link, ahead_bytes=0)
    sc, ss = pc.source("client"), ps.source("server")

    def steps(s):
        first = (s.triples((10000,)), s.solved_bits((1500,)))  # a prefill: on demand, nothing asked after it
        s.step_done(None)
        need = dict(s.asks)
        second = (s.triples((200_000,)), s.solved_bits((1500,)))  # a decode step at position 99
        s.step_done(99)
        waited, asked = s.settle(), (s._asked[("triple", None)], s._asked[("bits", None)])
        short = s.short_takes
        third = (s.triples((125_000,)), s.solved_bits((1560,)))  # 1500 * (1.02 + 2 / 100) = 1560
        return [first, second, third], need, waited, asked, s.short_takes - short
    try:
        (oc, need_c, wc, asked, short_c), (os_, need_s, ws, _, short_s) = fetch_both(sc, ss, steps)
        assert need_c == need_s and "step" not in need_c  # nothing after the prefill
        assert asked == (125_000, 1560)  # triples: the cap
        assert short_c == short_s == 0 and wc >= 0 and ws >= 0  # the third step found its items
        assert sc.asks == ss.asks and sc.asks["step"] == 2 and sc.step_ahead == ss.step_ahead == 3_000_000
        for (t1, b1), (t2, b2) in zip(oc, os_):
            (a, b, c), (a2, b2_, c2) = t1, t2
            assert np.array_equal(mul(reconstruct(a, a2), reconstruct(b, b2_), T), reconstruct(c, c2))
            (bits, r), (bits2, r2) = b1, b2
            assert np.array_equal((reconstruct(bits, bits2) << np.arange(bits.shape[-1])).sum(-1),
                                  reconstruct(r, r2))
    finally:
        sc.close(), ss.close()


def test_the_cli_default_look_ahead_is_the_dealers():
    import inspect

    from cryptogen.cli import dealer_cmd
    from cryptogen.mpc.provider_remote import DEFAULT_STEP_AHEAD
    assert inspect.signature(dealer_cmd).parameters["step_ahead_mib"].default.default << 20 == DEFAULT_STEP_AHEAD


def test_a_negative_step_look_ahead_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^the step look-ahead must be 0 or more MiB, got -1$"):
        DealerServer("127.0.0.1:0", tmp_path / "state", tmp_path / "out", step_ahead_bytes=-(1 << 20))
    assert not (tmp_path / "out").exists()  # refused before anything was written
