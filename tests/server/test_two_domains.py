"""The two trust domains end to end: ``cryptogen serve`` in its own OS process (embedded Ray),
clients in the test process or in processes where Ray cannot be imported, every byte over TLS.
Secure tokens are compared with plaintext greedy on the same checkpoint (exact equality)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import PROMPTS, ROOT, run_client

from cryptogen.client.remote import ConnectError, connect
from cryptogen.mpc.errors import ChannelError
from cryptogen.net import control
from cryptogen.net.channel import dial, frame

pytestmark = pytest.mark.slow
SECOND = [9]  # the no-Ray client's second prompt


@pytest.fixture(scope="module")
def no_ray_client(server):
    """One run of a client process where Ray cannot be imported, default provider (dealer-free he):
    the first prompt a prefill and a decode step, the second (one token: its margin is 0.21) a
    second session on the same connection (its prefill). Every byte the client sends is tapped
    (``SEND_TAP``) and searched there for its secret key; the process prints its tokens and what
    the search found."""
    code = f"""
import json
from cryptogen.net import channel
sent = []
channel.SEND_TAP = sent.append
from cryptogen.client.remote import connect
with connect({str(server.conn_file)!r}) as c:
    out = [list(c.generate(p, n)) for p, n in zip({[list(PROMPTS[0]), SECOND]!r}, (2, 1))]
    sk, public = c.keys.secret_key_bytes(), c.keys.public_context_bytes()
assert sys.modules['ray'] is None
data = b"".join(sent)
tap = dict(public_seen=public[-4096:] in data, sk_bytes=len(sk),
           sk_found=[part in data for part in (sk, sk[-4096:], sk[64:4160])])
print(json.dumps(dict(tokens=out, tap=tap)))
"""
    r = run_client(code)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_client_without_ray_gets_plaintext_greedy_for_two_prompts(no_ray_client, greedy):
    assert no_ray_client["tokens"] == [greedy(PROMPTS[0], 2), greedy(SECOND, 1)]


def test_the_client_never_sends_its_secret_key(no_ray_client):
    tap = no_ray_client["tap"]
    assert tap["public_seen"]  # the tap saw the sessions' traffic
    assert tap["sk_bytes"] > 4096 and tap["sk_found"] == [False, False, False]


def test_wrong_api_key_is_refused_with_one_line_and_no_work(server, tmp_path):
    before = server.metrics()
    bad = json.loads(server.conn_file.read_text())
    bad["api_key"] = "0" * 64
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "cryptogen.cli", "generate", "--connect", str(path), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and "API key" in lines[-1] and "Traceback" not in r.stderr
    after = server.metrics()
    key = 'cryptogen_server_sessions_refused_total{reason="auth"}'
    assert after[key] == before[key] + 1
    assert after["cryptogen_server_sessions_total"] == before["cryptogen_server_sessions_total"]  # no work started


def test_hijacker_who_connects_first_is_rejected_and_the_session_is_unaffected(server, dealer, greedy, monkeypatch):
    from cryptogen.client import remote

    info = json.loads(server.conn_file.read_text())
    seen = {}
    original = remote._Session._open_links

    def hijack_first(self, links):
        seen["links"] = links
        for link in links:  # the attacker knows the worker's address, not the link token
            ch = dial(link["host"], link["port"], info["cert"], info["fingerprint"])
            ch.send_bytes(frame(np.frombuffer(os.urandom(32).hex().encode(), np.uint8)))
            with pytest.raises(ChannelError):
                ch.recv()  # the worker dropped it
            ch.abort()
        return original(self, links)

    monkeypatch.setattr(remote._Session, "_open_links", hijack_first)
    with connect(server.conn_file, dealer=dealer.client_file) as c:
        assert list(c.generate(PROMPTS[0], 2, provider="dealer")) == greedy(PROMPTS[0], 2)
    link = seen["links"][0]  # a replay of the real, already used token is refused too
    ch = dial(link["host"], link["port"], info["cert"], info["fingerprint"])
    ch.send_bytes(frame(np.frombuffer(link["tokens"]["online"].encode(), np.uint8)))
    with pytest.raises(ChannelError):
        ch.recv()
    ch.abort()


BAD_FRAMES = {
    "garbage": b"\x07\x09garbage that is no frame",
    "oversized": frame(np.zeros(1, np.int64))[:2] + (1 << 40).to_bytes(8, "little"),
    "wrong dtype": frame(np.zeros(8192, np.float64)),
}


def test_bad_frames_end_only_their_sessions(server, dealer, greedy):
    """Three bad sessions, one after another (each sends one kind of bad frame on its data link), while
    one honest session runs: each bad session ends with a one-line session error, the honest one gets
    plaintext greedy. (Many more frame mutations: tests/fuzz/test_fuzz_server.py.)"""
    out, errors = {}, []

    def honest():
        try:
            with connect(server.conn_file, dealer=dealer.client_file) as c:
                out["tokens"] = list(c.generate(PROMPTS[1], 2, provider="dealer"))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)
    th = threading.Thread(target=honest)
    th.start()
    from cryptogen.sampling import SamplingConfig
    for kind, bad in BAD_FRAMES.items():
        with connect(server.conn_file, dealer=dealer.client_file) as c:
            s = c._session([5, 6], SamplingConfig(), "kv-reuse", "dealer").__enter__()
            try:
                s.parties[0].chan.send_bytes(bad)
                control.send(c.chan, "forward", start=0, T=2, logits="last", reset=False)
                with pytest.raises(control.RemoteError) as err:
                    control.recv(c.chan, "done")
                assert err.value.code == "session" and "\n" not in str(err.value), kind
            finally:
                s.__exit__(None, None, None)
    th.join(300)
    assert not errors and out["tokens"] == greedy(PROMPTS[1], 2)


def test_killed_client_frees_its_session_within_30s(server, dealer):
    """Catches: a session not freed on disconnect (gateway count) or a worker keeping its cache
    (``ServerPool.close`` / ``WorkerActor.close`` made a no-op)."""
    code = f"""
from cryptogen.client.remote import connect
c = connect({str(server.conn_file)!r}, dealer={str(dealer.client_file)!r})
for t in c.generate([1, 2, 3], 40, provider="dealer"):
    print(t, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", "import sys\nsys.modules['ray'] = None\n" + code],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip().isdigit()  # generating: the session is open
        assert server.metrics()["cryptogen_server_sessions_open"] >= 1
        assert server.metrics()['cryptogen_kv_cache_bytes{worker="w0"}'] > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        assert server.wait_metric("cryptogen_server_sessions_open", lambda v: v == 0, 30) == 0
        # and the worker freed what the session held (its encrypted KV cache)
        assert server.wait_metric('cryptogen_kv_cache_bytes{worker="w0"}', lambda v: v == 0, 30) == 0
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_connection_details_give_one_line_errors(server, tmp_path):
    with pytest.raises(ConnectError, match="not JSON"):
        (tmp_path / "x.json").write_text("nope")
        connect(tmp_path / "x.json")
    info = json.loads(server.conn_file.read_text())
    with pytest.raises(ConnectError, match="HOST:PORT"):
        connect(server="nowhere", server_cert=str(tmp_path / "x.json"), api_key="k")
    cert = tmp_path / "cert.pem"
    cert.write_text(info["cert"])
    host, port = info["address"].rsplit(":", 1)
    with pytest.raises(ConnectError, match="API key"):
        connect(server=f"{host}:{port}", server_cert=str(cert), api_key="1" * 64)
