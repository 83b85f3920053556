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
                gw._steps(server, "s", "kv-reuse")
    finally:
        gw.close()
