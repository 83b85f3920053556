"""The gateway's control protocol without Ray (no workers: only what happens before a session's
links): API key, busy, idle timeout, malformed messages. The server's own counts are checked."""
import time

import numpy as np
import pytest

from cryptogen.he.params import HEConfig
from cryptogen.model import GPTConfig
from cryptogen.mpc.errors import ChannelError
from cryptogen.net import control
from cryptogen.net.channel import dial
from cryptogen.net.tls import ensure_certificate, fingerprint
from cryptogen.plan import make_plan
from cryptogen.server.gateway import Gateway, GatewayConfig
from cryptogen.server.session import ServerSession

CFG = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
KEY = "ab" * 32


@pytest.fixture()
def gateway(tmp_path):
    tls = ensure_certificate(tmp_path)
    plan = make_plan(CFG.n_layer, CFG.n_head, CFG.d_ff, 1)
    gw = Gateway(None, CFG, plan, 1, HEConfig(), None, KEY, tls, GatewayConfig(max_sessions=1, idle_timeout=2.0))
    host, port = gw.listen("127.0.0.1", 0)
    gw.addr = (host, port, tls[0], fingerprint(tls[0]))
    yield gw
    gw.close()


def _hello(gw, key=KEY):
    host, port, cert, pin = gw.addr
    chan = dial(host, port, cert, pin)
    control.send(chan, "hello", api_key=key, version=control.VERSION)
    return chan


def test_wrong_key_is_refused_and_counted(gateway):
    chan = _hello(gateway, "00" * 32)
    with pytest.raises(control.RemoteError) as err:
        control.recv(chan, "welcome")
    assert err.value.code == "auth" and "API key" in str(err.value)
    assert gateway.stats.as_dict()["refused"]["auth"] == 1 and gateway.stats.as_dict()["opened"] == 0


def test_welcome_carries_only_public_facts(gateway):
    chan = _hello(gateway)
    w = control.recv(chan, "welcome")
    assert GPTConfig.from_hf(w["model"]) == CFG and HEConfig.from_dict(w["he"]) == HEConfig()
    assert set(w) == {"type", "version", "model", "he", "workers", "layer_groups", "tokenizer", "name", "dealer",
                       "logits"}
    control.send(chan, "close")


def test_idle_connection_times_out_and_is_counted(gateway):
    chan = _hello(gateway)
    control.recv(chan, "welcome")
    t0 = time.monotonic()
    with pytest.raises(control.RemoteError) as err:
        control.recv(chan, "session")  # we send nothing: the server's idle timeout (2 s) ends it
    assert err.value.code == "timeout" and time.monotonic() - t0 < 10
    assert gateway.stats.as_dict()["timed_out"] == 1


def test_busy_server_says_retry_after(gateway):
    gateway.stats.opening(1)  # one session already open (the limit)
    chan = _hello(gateway)
    control.recv(chan, "welcome")
    control.send(chan, "open", mode="kv-reuse", provider="he")
    control.send_blob(chan, b"x" * 100)
    with pytest.raises(control.RemoteError) as err:
        control.recv(chan, "session")
    assert err.value.code == "busy" and err.value.retry_after > 0 and "retry after" in str(err.value)
    assert gateway.stats.as_dict()["refused"]["busy"] == 1


@pytest.mark.parametrize("msg", [np.frombuffer(b"not json", np.uint8), np.zeros(3, np.int64),
                                 np.frombuffer(b'{"type": "open", "mode": "fast", "provider": "he"}', np.uint8)])
def test_malformed_control_messages_get_bad_request(gateway, msg):
    chan = _hello(gateway)
    control.recv(chan, "welcome")
    chan.send(msg)
    with pytest.raises(control.RemoteError) as err:
        control.recv(chan, "session")
    assert err.value.code == "bad_request"
    with pytest.raises(ChannelError):  # and the connection is over
        control.recv(chan, "session")


def test_forward_fields_are_checked():
    ok = control.Forward.from_msg({"start": 3, "T": 1, "logits": "last", "reset": False}, 64)
    assert ok == control.Forward(3, 1, "last")
    for bad in ({"start": -1, "T": 1, "logits": "last"}, {"start": 60, "T": 10, "logits": "last"},
                {"start": 0, "T": 1, "logits": "some"}, {"start": "0", "T": 1, "logits": None},
                {"start": 0, "T": True, "logits": None}, {"start": 0, "T": 1, "logits": None, "reset": 1}):
        with pytest.raises(control.ProtocolError):
            control.Forward.from_msg(bad, 64)


def test_token_only_server_says_so_and_refuses_logit_steps(tmp_path):
    """`serve --token-only`: the welcome tells the client, and a step that would open logits
    ("last" or "all") ends the session with a bad_request; the refusal comes before any work."""
    from types import SimpleNamespace

    from cryptogen.mpc.channel import channel_pair

    tls = ensure_certificate(tmp_path)
    plan = make_plan(CFG.n_layer, CFG.n_head, CFG.d_ff, 1)
    gw = Gateway(SimpleNamespace(workers=[]), CFG, plan, 1, HEConfig(), None, KEY, tls,
                 GatewayConfig(token_only=True))
    host, port = gw.listen("127.0.0.1", 0)
    try:
        chan = dial(host, port, tls[0], fingerprint(tls[0]))
        control.send(chan, "hello", api_key=KEY, version=control.VERSION)
        assert control.recv(chan, "welcome")["logits"] is False
        for logits in ("last", "all"):
            client, server = channel_pair()
            control.send(client, "forward", **control.Forward(0, 3, logits).to_msg())
            with pytest.raises(control.ProtocolError, match="--token-only"):
                gw._steps(server, ServerSession.new(b"", "kv-reuse", "he"))
    finally:
        gw.close()


def test_resume_needs_the_sessions_secret(gateway):
    """A parked session (its client dropped) resumes only with its id AND its 256-bit resume secret;
    a wrong secret or an unknown id gets a one-line bad_request, and the parked session stays
    resumable. Catches: the secret not compared, a failed attempt discarding the session."""
    sess = ServerSession.new(b"", "kv-reuse", "he")
    gateway._parked[sess.sid] = sess
    for sid, secret in ((sess.sid, "00" * 32), ("f" * 32, sess.secret), (sess.sid, "")):
        chan = _hello(gateway)
        control.recv(chan, "welcome")
        control.send(chan, "resume", sid=sid, secret=secret, cached=0)
        with pytest.raises(control.RemoteError) as err:
            control.recv(chan, "retry")
        assert err.value.code == "bad_request" and "no such session" in str(err.value)
        assert "\n" not in str(err.value)
    assert gateway._parked.get(sess.sid) is sess


def test_a_parked_session_expires_after_the_grace_period(tmp_path):
    """Nothing lingers: a dropped client's session is freed once ``resume_grace`` has passed."""
    tls = ensure_certificate(tmp_path)
    plan = make_plan(CFG.n_layer, CFG.n_head, CFG.d_ff, 1)
    gw = Gateway(None, CFG, plan, 1, HEConfig(), None, KEY, tls, GatewayConfig(resume_grace=0.2))
    assert gw.stats.opening(4)
    sess = ServerSession.new(b"", "kv-reuse", "he")
    gw._park(sess)
    assert gw.stats.as_dict()["open"] == 1
    time.sleep(0.6)
    assert sess.sid not in gw._parked and gw.stats.as_dict()["open"] == 0 and sess.checkpoints == []


def test_kv_cache_budget_refuses_the_step_before_any_work():
    """A step whose encrypted KV cache would pass ``kv_budget`` ends the session with a one-line
    error naming the budget, before any worker is called (the pool here has none)."""
    from cryptogen import secure_plan as sp

    plan = make_plan(CFG.n_layer, CFG.n_head, CFG.d_ff, 1)
    lays = sp.kv_layouts(CFG, plan, HEConfig().n)
    assert [lay.heads for lay in lays] == [CFG.n_head] * CFG.n_layer  # one head group per layer
    tpc = lays[0].tpc  # tokens per cache ciphertext: the cache grows in steps
    gw = Gateway.__new__(Gateway)
    gw.cfg, gw.he_config, gw.plan = CFG, HEConfig(), plan
    gw.options = GatewayConfig(kv_budget=sp.kv_cache_bytes(CFG, HEConfig(), tpc, plan))
    sess = ServerSession.new(b"", "kv-reuse", "he")
    gw._check_step(sess, control.Forward(0, tpc, "token"))  # within the budget
    with pytest.raises(control.ProtocolError, match="budget of .* MiB per session"):
        gw._check_step(sess, control.Forward(0, tpc + 1, "token"))
    assert sp.kv_cache_bytes(CFG, HEConfig(), tpc + 1, plan) == 2 * sp.kv_cache_bytes(CFG, HEConfig(), tpc, plan)
