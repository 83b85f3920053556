"""A real Prometheus scrapes the client actor's exporter during a real secure generation on an
embedded Ray cluster; PromQL sees tokens, HE operations and bytes go up.

Needs /usr/bin/prometheus (tools/install-prometheus.sh); fails, never skips, without it.
"""
import time
import urllib.error
import urllib.request

import pytest
import torch

from cryptogen.client.generate import SecureGenerator
from cryptogen.cluster.connect import connect, shutdown
from cryptogen.model import GPT, GPTConfig
from prom import prometheus  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow

TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
TOKENS = "sum(cryptogen_token_latency_seconds_count)"
DECODE = 'sum(cryptogen_token_latency_seconds_count{phase="decode", mode="kv-reuse"})'
HE_OPS = "sum(cryptogen_he_operations_total)"
CT_PT = 'sum(cryptogen_he_operations_total{op="ct_pt_mul"})'
BYTES = "sum(cryptogen_transfer_bytes_total)"
N_NEW = 5


@pytest.fixture(scope="module")
def cluster():
    shutdown()
    connect(None, num_cpus=4)
    yield
    shutdown()


def _reachable(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def test_prometheus_scrapes_a_secure_generation(cluster, prometheus):  # noqa: F811
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    gen = SecureGenerator(model, workers=1, mode="kv-reuse", metrics_port=0)
    port = gen.metrics_port
    try:
        assert isinstance(port, int) and port > 0 and _reachable(port)
        server = prometheus([f"127.0.0.1:{port}"])
        assert server.wait_until('up{job="cryptogen"}', lambda v: v == 1, timeout=20) == 1
        before = {q: server.wait_until(q, lambda v: v is not None) for q in (TOKENS, DECODE, HE_OPS, CT_PT, BYTES)}
        assert before[TOKENS] == 0  # every series is exported (at 0) before the first token

        res = gen.generate([3], N_NEW)  # a one-token prompt keeps the prefill short
        assert len(res.tokens) == N_NEW and len(res.timings) == N_NEW

        # one latency observation per generated token: 1 prefill + N_NEW - 1 decode steps
        assert server.wait_until(TOKENS, lambda v: v == before[TOKENS] + N_NEW, timeout=20) == N_NEW
        assert server.wait_until(DECODE, lambda v: v == before[DECODE] + N_NEW - 1) == N_NEW - 1
        assert server.wait_until(HE_OPS, lambda v: v > before[HE_OPS]) > 0
        assert server.wait_until(CT_PT, lambda v: v > before[CT_PT]) > 0
        assert server.wait_until(BYTES, lambda v: v > before[BYTES]) > 0
        # PromQL over the scraped history (the counters went up between scrapes)
        inc = server.wait_until("sum(increase(cryptogen_token_latency_seconds_count[1m]))",
                                lambda v: v is not None and v > 0)
        assert inc > 0
        assert server.wait_until('sum(increase(cryptogen_he_operations_total{kernel="attention"}[1m]))',
                                 lambda v: v is not None and v > 0) > 0
        assert server.wait_until('sum(increase(cryptogen_transfer_bytes_total{direction="to_server"}[1m]))',
                                 lambda v: v is not None and v > 0) > 0
        assert server.value("max(cryptogen_kv_cache_bytes)") > 0  # the worker's encrypted cache, merged in
    finally:
        gen.close()
    deadline = time.monotonic() + 15  # the client actor is killed: its exporter goes away with it
    while _reachable(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _reachable(port)
