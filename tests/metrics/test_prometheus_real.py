"""A real Prometheus scrapes the exporter; PromQL sees the counters grow.

Needs /usr/bin/prometheus (tools/install-prometheus.sh); fails, never skips, without it.
One exporter and one Prometheus serve the whole module; tests compare before/after values.
"""
import subprocess
from pathlib import Path

import pytest

from cryptogen.exporter import MetricsExporter
from cryptogen.telemetry import Telemetry
from prom import prometheus, require_prometheus  # noqa: F401  (prometheus: a fixture)
from test_dashboard import DASHBOARD, dashboard_exprs, load_dashboard

DECODE_COUNT = 'sum(cryptogen_token_latency_seconds_count{phase="decode", mode="kv-reuse"})'
CT_PT = 'cryptogen_he_operations_total{kernel="linear", op="ct_pt_mul"}'
CONFIG = Path(DASHBOARD).parents[1] / "prometheus.yml"


def generate(t: Telemetry, tokens: int) -> None:
    for _ in range(tokens):
        with t.stage("attention"):
            t.he_ops("linear", ct_pt=8, rotations=2)
        t.traffic(bytes_to_server=2048, bytes_to_client=1024, rounds=4)
        t.token("decode", "kv-reuse", 0.3)


@pytest.fixture(scope="module")
def scraped(prometheus):
    """(telemetry, prometheus server) with the server scraping an exporter every second."""
    telemetry = Telemetry("client")
    generate(telemetry, 1)
    with MetricsExporter(telemetry, port=0) as exp:
        yield telemetry, prometheus([f"127.0.0.1:{exp.port}"])


def test_prometheus_sees_counters_increase(scraped):
    telemetry, server = scraped
    before = server.wait_until(DECODE_COUNT, lambda v: v is not None)
    ct_pt_before = server.value(CT_PT)
    assert before >= 1 and ct_pt_before == 8 * before
    generate(telemetry, 3)
    assert server.wait_until(DECODE_COUNT, lambda v: v == before + 3) == before + 3
    assert server.wait_until('count_over_time(up{job="cryptogen"}[1m])',
                             lambda v: v is not None and v >= 2) >= 2
    assert server.value('up{job="cryptogen"}') == 1
    assert server.value(CT_PT) == ct_pt_before + 24
    increase = server.value(f"increase({CT_PT}[1m])")
    assert increase is not None and increase > 0
    rate = server.value('sum(rate(cryptogen_transfer_bytes_total{direction="to_server"}[1m]))')
    assert rate is not None and rate > 0


def test_dashboard_queries_evaluate(scraped):
    telemetry, server = scraped
    generate(telemetry, 2)
    server.wait_until("sum(cryptogen_tokens_total)", lambda v: v is not None and v >= 2)
    for expr in dashboard_exprs(load_dashboard()):
        promql = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        server.query(promql)                       # raises on a PromQL error
    p95 = server.query('histogram_quantile(0.95, sum by (le, phase, mode) '
                       '(cryptogen_token_latency_seconds_bucket{phase="decode"}))')
    by_mode = {r["metric"]["mode"]: float(r["value"][1]) for r in p95}
    assert 0.25 < by_mode["kv-reuse"] <= 0.5       # all tokens in the (0.25, 0.5] bucket


def test_query_errors_are_raised(scraped):
    _telemetry, server = scraped
    with pytest.raises(ValueError, match="query failed"):
        server.query("sum(rate(cryptogen_tokens_total[1m])")


def test_promtool_accepts_shipped_config():
    out = subprocess.run(["/usr/bin/promtool", "check", "config", str(CONFIG)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_missing_binary_fails_not_skips(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="install-prometheus.sh"):
        require_prometheus(str(tmp_path / "no-prometheus"))
