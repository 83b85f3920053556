"""A real Prometheus scrapes BOTH exporters during a real secure generation: the client's (this
process, ``connect(..., metrics_port=0)``) and the server's (``cryptogen serve --metrics-port 0`` in
its own process with its own embedded Ray, via ``LocalServer``). PromQL sees tokens, latency and
bytes go up on the client's; HE operations and the KV cache on the server's; the server's open
sessions go 1 then 0.

Needs /usr/bin/prometheus (tools/install-prometheus.sh); fails, never skips, without it.
"""
import time
import urllib.error
import urllib.request

import pytest
import torch

from cryptogen.client.local_server import LocalServer
from cryptogen.client.remote import connect
from cryptogen.model import GPT, GPTConfig
from prom import prometheus  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
N_NEW = 2  # a prefill and a decode step


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local ``cryptogen serve`` of a tiny random checkpoint (no tokenizer: token ids only), with metrics."""
    folder = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(folder)
    srv = LocalServer(str(folder), workers=1, extra=["--metrics-port", "0"]).start()
    try:
        yield srv, int(srv.metrics_url.rsplit(":", 1)[1].split("/")[0])
    finally:
        srv.stop()


def _reachable(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def test_prometheus_scrapes_client_and_server_during_a_secure_generation(server, prometheus):  # noqa: F811
    srv, sport = server
    conn = connect(srv.connection_file, metrics_port=0)
    cport = conn.exporter.port
    try:
        assert isinstance(cport, int) and cport > 0 and _reachable(cport) and _reachable(sport)
        prom = prometheus([f"127.0.0.1:{cport}", f"127.0.0.1:{sport}"])
        client, srv_sel = f'instance="127.0.0.1:{cport}"', f'instance="127.0.0.1:{sport}"'
        q = {  # the client's exporter
            "tokens": f"sum(cryptogen_token_latency_seconds_count{{{client}}})",
            "decode": f'sum(cryptogen_token_latency_seconds_count{{{client}, phase="decode", mode="kv-reuse"}})',
            "latency": f"sum(cryptogen_token_latency_seconds_sum{{{client}}})",
            "bytes": f"sum(cryptogen_transfer_bytes_total{{{client}}})",
            "rounds": f"sum(cryptogen_protocol_rounds_total{{{client}}})",
            # the server's exporter
            "he_ops": f"sum(cryptogen_he_operations_total{{{srv_sel}}})",
            "ct_pt": f'sum(cryptogen_he_operations_total{{{srv_sel}, op="ct_pt_mul"}})',
            "kv": f"sum(cryptogen_kv_cache_bytes{{{srv_sel}}})",
            "open": f"sum(cryptogen_server_sessions_open{{{srv_sel}}})",
            "sessions": f"sum(cryptogen_server_sessions_total{{{srv_sel}}})",
        }
        assert prom.wait_until('sum(up{job="cryptogen"})', lambda v: v == 2, timeout=20) == 2
        before = {k: prom.wait_until(e, lambda v: v is not None) for k, e in q.items()}
        assert before["tokens"] == 0 and before["open"] == 0  # every series is exported (at 0) before the first token

        seen_open = []

        def on_step(timing):  # mid-session (after the prefill): Prometheus sees the open session and its cache
            if timing.phase == "prefill":
                seen_open.append(prom.wait_until(q["open"], lambda v: v == 1, timeout=30))
                seen_open.append(prom.wait_until(q["kv"], lambda v: v is not None and v > 0, timeout=30))

        tokens = list(conn.generate([3], N_NEW, on_step=on_step))  # a one-token prompt keeps the prefill short
        assert len(tokens) == N_NEW and all(0 <= t < TINY.vocab_size for t in tokens)
        assert seen_open[0] == 1 and seen_open[1] > 0

        # client: one latency observation per generated token (1 prefill + N_NEW - 1 decode), bytes, rounds
        assert prom.wait_until(q["tokens"], lambda v: v == before["tokens"] + N_NEW, timeout=20) == N_NEW
        assert prom.wait_until(q["decode"], lambda v: v == before["decode"] + N_NEW - 1) == N_NEW - 1
        assert prom.wait_until(q["latency"], lambda v: v > before["latency"]) > 0
        assert prom.wait_until(q["bytes"], lambda v: v > before["bytes"]) > 0
        assert prom.wait_until(q["rounds"], lambda v: v > before["rounds"]) > 0
        # server: HE operations by its workers; the session closed (cache freed), counted once
        assert prom.wait_until(q["he_ops"], lambda v: v > before["he_ops"]) > 0
        assert prom.wait_until(q["ct_pt"], lambda v: v > before["ct_pt"]) > 0
        assert prom.wait_until(q["open"], lambda v: v == 0, timeout=20) == 0
        assert prom.value(q["sessions"]) == before["sessions"] + 1
        assert prom.value(f'sum(cryptogen_server_sessions_refused_total{{{srv_sel}}})') == 0
        # PromQL over the scraped history (the counters went up between scrapes)
        assert prom.wait_until(f"sum(increase(cryptogen_token_latency_seconds_count{{{client}}}[1m]))",
                               lambda v: v is not None and v > 0) > 0
        assert prom.wait_until(f'sum(increase(cryptogen_he_operations_total{{{srv_sel}, kernel="attention"}}[1m]))',
                               lambda v: v is not None and v > 0) > 0
        assert prom.wait_until(f'sum(increase(cryptogen_transfer_bytes_total{{{client}, direction="to_server"}}[1m]))',
                               lambda v: v is not None and v > 0) > 0
        assert prom.value(f"max(max_over_time(cryptogen_kv_cache_bytes{{{srv_sel}}}[1m]))") > 0
        assert prom.value(f"max_over_time(cryptogen_server_sessions_open{{{srv_sel}}}[1m])") == 1
    finally:
        conn.close()
    deadline = time.monotonic() + 15  # the connection closed: the client's exporter went with it
    while _reachable(cport) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _reachable(cport) and _reachable(sport)  # the server keeps serving its metrics
