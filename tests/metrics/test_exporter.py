"""MetricsExporter: serves the cryptogen_* families over HTTP on loopback."""
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cryptogen.exporter import MetricsExporter, MetricsPortInUse
from cryptogen.telemetry import (DIRECTIONS, HE_OPS, KERNELS, MODES, PHASES, STAGES,
                                 TRIPLE_KINDS, Telemetry)

EXPECTED_TYPES = {
    "cryptogen_token_latency_seconds": "histogram",
    "cryptogen_tokens": "counter",
    "cryptogen_stage_seconds": "counter",
    "cryptogen_he_operations": "counter",
    "cryptogen_transfer_bytes": "counter",
    "cryptogen_protocol_rounds": "counter",
    "cryptogen_refreshes": "counter",
    "cryptogen_correlated_randomness_produced": "counter",
    "cryptogen_correlated_randomness_consumed": "counter",
    "cryptogen_kv_cache_ciphertexts": "gauge",
    "cryptogen_kv_cache_bytes": "gauge",
    "cryptogen_active_sessions": "gauge",
}
ALLOWED = {"phase": set(PHASES), "mode": set(MODES), "stage": set(STAGES),
           "kernel": set(KERNELS), "op": set(HE_OPS), "direction": set(DIRECTIONS),
           "kind": set(TRIPLE_KINDS)}


def scrape(url: str) -> dict:
    """{sample name: {frozenset(labels.items()): value}} plus {'__types__': {family: type}}."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {"__types__": {}}
    for fam in text_string_to_metric_families(text):
        out["__types__"][fam.name] = fam.type
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[name][frozenset(labels.items())]


@pytest.fixture(scope="module")
def telemetry():
    t = Telemetry("client")
    t.token("prefill", "kv-reuse", 2.0)
    t.token("decode", "kv-reuse", 0.2)
    t.token("decode", "kv-reuse", 0.4)
    t.token("decode", "recompute", 30.0)
    t.add_stage_time("attention", 1.5)
    t.he_ops("attention", ct_ct=6, rotations=12)
    t.traffic(bytes_to_server=4096, bytes_to_client=1024, rounds=5)
    t.kv_cache(0, ciphertexts=3, nbytes=786432)
    t.kv_cache(1, ciphertexts=2, nbytes=524288)
    t.refreshes(1)
    t.sessions(1)
    t.triples("bits", produced=64, consumed=32)
    return t


@pytest.fixture(scope="module")
def exporter(telemetry):
    exp = MetricsExporter(telemetry, port=0).start()
    yield exp
    exp.stop()


def test_serves_expected_families(exporter):
    assert exporter.port > 0 and exporter.url.startswith("http://127.0.0.1:")
    m = scrape(exporter.url)
    assert m["__types__"] == EXPECTED_TYPES


def test_values_after_synthetic_updates(exporter, telemetry):
    m = scrape(exporter.url)
    assert value(m, "cryptogen_token_latency_seconds_count", phase="decode", mode="kv-reuse") == 2
    assert value(m, "cryptogen_token_latency_seconds_sum", phase="decode",
                 mode="kv-reuse") == pytest.approx(0.6)
    assert value(m, "cryptogen_token_latency_seconds_bucket", phase="decode", mode="kv-reuse",
                 le="0.25") == 1
    assert value(m, "cryptogen_tokens_total", mode="kv-reuse") == 3
    assert value(m, "cryptogen_stage_seconds_total", stage="attention") == 1.5
    assert value(m, "cryptogen_stage_seconds_total", stage="gelu") == 0      # pre-initialised
    rotations = value(m, "cryptogen_he_operations_total", kernel="attention", op="rotation")
    assert rotations >= 12
    assert value(m, "cryptogen_transfer_bytes_total", direction="to_server") == 4096
    assert value(m, "cryptogen_protocol_rounds_total") == 5
    assert value(m, "cryptogen_kv_cache_bytes", worker="w1") == 524288
    assert value(m, "cryptogen_kv_cache_ciphertexts", worker="w0") == 3
    assert value(m, "cryptogen_refreshes_total") == 1
    assert value(m, "cryptogen_active_sessions") == 1
    assert value(m, "cryptogen_correlated_randomness_consumed_total", kind="bits") == 32
    # read at scrape time: a later update shows up in the next scrape
    telemetry.he_ops("attention", rotations=3)
    m2 = scrape(exporter.url)
    assert value(m2, "cryptogen_he_operations_total", kernel="attention",
                 op="rotation") == rotations + 3


def test_labels_are_low_cardinality(exporter):
    m = scrape(exporter.url)
    for name, series in m.items():
        if name == "__types__":
            continue
        assert name.startswith("cryptogen_")
        for labels in series:
            for key, val in labels:
                if key == "worker":
                    assert val in {"w0", "w1"}
                elif key != "le":
                    assert val in ALLOWED[key], (name, key)


def test_port_in_use_names_the_port(telemetry):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(MetricsPortInUse) as err:
            MetricsExporter(telemetry, port=port).start()
    msg = str(err.value)
    assert str(port) in msg and "--metrics-port" in msg and "--metrics-port 0" in msg
    assert err.value.port == port


def test_stop_closes_the_server(telemetry):
    exp = MetricsExporter(telemetry, port=0)
    with exp:
        url = exp.url
        scrape(url)
    assert not exp.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    exp.stop()                                  # idempotent


def test_accepts_a_snapshot_callable(telemetry):
    with MetricsExporter(telemetry.snapshot, port=0) as exp:
        assert value(scrape(exp.url), "cryptogen_refreshes_total") == 1


def test_rejects_bad_port(telemetry):
    with pytest.raises(ValueError):
        MetricsExporter(telemetry, port=70000)
