"""Grafana dashboard, Grafana provisioning, Prometheus config and docs/METRICS.md agree with the two
exporters: the client's (``Telemetry`` families) and the server's (the same plus the gateway's sessions)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from cryptogen.exporter import MetricsExporter
from cryptogen.server.stats import GatewayCollector, GatewayStats
from cryptogen.telemetry import Telemetry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METRICS_DOC = CONFIGS.parent / "docs" / "METRICS.md"
DASHBOARD = CONFIGS / "grafana" / "cryptogen-dashboard.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "atop", "inf", "nan"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(dash: dict) -> list:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            label_values = re.fullmatch(r"\s*label_values\(\s*([^,\s]+)\s*,.*\)\s*", query)
            exprs.append(label_values.group(1) if label_values else query)
    return exprs


def metric_names(expr: str) -> set:
    """Metric names a PromQL expression reads: identifiers left after removing strings,
    label matchers, ranges, grouping clauses, Grafana variables, functions and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def client_families() -> dict:
    """{family name: type} of the client's exporter (``Connection(metrics_port=...)``)."""
    exporter = MetricsExporter(Telemetry("client"), port=0)        # not started: registry only
    return {fam.name: fam.type for fam in exporter.registry.collect()}


def server_families() -> dict:
    """{family name: type} of the server's exporter, built as ``cryptogen serve --metrics-port`` builds it."""
    exporter = MetricsExporter(Telemetry("server"), port=0)
    exporter.registry.register(GatewayCollector(GatewayStats()))
    return {fam.name: fam.type for fam in exporter.registry.collect()}


def exported_families() -> dict:
    """{family name: type} over both exporters."""
    return {**client_families(), **server_families()}


def sample_name(family: str, kind: str) -> str:
    return family + ("_total" if kind == "counter" else "")


def resolve(name: str, families: dict):
    """Map a sample name (…_total, …_bucket, …) to its exported family, or None."""
    for family, kind in families.items():
        if any(name == family + suffix for suffix in SUFFIXES[kind]):
            return family
    return None


def unknown_names(exprs, families) -> set:
    refs = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
    return {n for n in refs if resolve(n, families) is None}


def test_extractor():
    expr = ('histogram_quantile(0.95, sum by (le, phase) (rate(cryptogen_token_latency_seconds_'
            'bucket{job=~"$job", stage=~"a|b"}[$__rate_interval]))) / on(job) '
            'sum without (mode) (cryptogen_tokens_total offset 5m) > bool 2e3')
    assert metric_names(expr) == {"cryptogen_token_latency_seconds_bucket",
                                  "cryptogen_tokens_total"}


def test_check_can_fail():
    families = exported_families()
    bad = ["rate(cryptogen_bogus_total[5m])", "cryptogen_tokens",          # counter w/o _total
           "sum(cryptogen_kv_cache_bytes_total)", "cryptogen_refreshes_total{x=\"y\"}"]
    assert unknown_names(bad, families) == {"cryptogen_bogus_total", "cryptogen_tokens",
                                            "cryptogen_kv_cache_bytes_total"}


def test_dashboard_queries_only_exported_metrics():
    families = exported_families()
    exprs = dashboard_exprs(load_dashboard())
    refs = set().union(*(metric_names(e) for e in exprs))
    assert refs, "no metric names found in the dashboard"
    assert unknown_names(exprs, families) == set()
    used = {resolve(n, families) for n in refs}
    assert used == set(families), f"exported but not on the dashboard: {set(families) - used}"


def test_latency_quantiles_by_phase_and_mode():
    exprs = dashboard_exprs(load_dashboard())
    for q in ("0.5", "0.95"):
        assert any(e.startswith(f"histogram_quantile({q},") and "le, phase, mode" in e
                   and "cryptogen_token_latency_seconds_bucket" in e for e in exprs)


def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for panel in dash["panels"]:
        assert panel["targets"] and panel["datasource"]["type"] == "prometheus"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_grafana_provisioning():
    prov = CONFIGS / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    boards = yaml.safe_load((prov / "dashboards.yaml").read_text())
    assert boards["apiVersion"] == 1 and boards["providers"][0]["type"] == "file"


def test_server_sessions_on_the_dashboard():
    exprs = dashboard_exprs(load_dashboard())
    for name in ("cryptogen_server_sessions_open", "cryptogen_server_sessions_total",
                 "cryptogen_server_sessions_timed_out_total", "cryptogen_server_sessions_failed_total"):
        assert any(name in metric_names(e) for e in exprs), name
    assert any("sum by (reason)" in e and "cryptogen_server_sessions_refused_total" in e for e in exprs)


def test_panels_say_which_exporter():
    """Client and server export the same Telemetry families (at 0 where a side records nothing):
    each panel names the process whose exporter its numbers come from."""
    for panel in load_dashboard()["panels"]:
        text = panel.get("description", "").lower()
        assert "client" in text or "server" in text, panel["title"]


def test_metrics_doc_lists_every_family_with_its_exporter():
    doc = METRICS_DOC.read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(cryptogen_\w+)` \|(.*)$", doc, re.M)}
    for fams in (client_families(), server_families()):
        for family, kind in fams.items():
            assert sample_name(family, kind) in rows, f"{sample_name(family, kind)} missing from docs/METRICS.md"
    for family, kind in server_families().items():
        if family not in client_families():
            assert "server" in rows[sample_name(family, kind)], family


@pytest.mark.parametrize("key", ["global", "client", "server"])
def test_prometheus_config(key):
    cfg = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"cryptogen-client", "cryptogen-server"}
    job = jobs.get(f"cryptogen-{key}")
    interval = (cfg["global"] if key == "global" else job)["scrape_interval"]
    assert re.fullmatch(r"[1-5]s", interval)
    if job is not None:
        (static,) = job["static_configs"]
        port = {"client": 9108, "server": 9109}[key]
        assert static["targets"] == [f"127.0.0.1:{port}"] and static["labels"] == {"role": key}
