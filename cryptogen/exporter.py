"""Prometheus exporter for CryptoGen run statistics (the client and the server gateway each serve one).

The exporter owns no statistics: a custom collector reads a
:class:`cryptogen.telemetry.TelemetrySnapshot` at scrape time and turns it into metric families,
in its own ``CollectorRegistry`` (no process/platform collectors, nothing global). Every allowed
label combination is exported from the start (value 0), so ``rate()``/``increase()`` see a series'
first change. See docs/METRICS.md for the metric list.
"""
from __future__ import annotations

import errno
import logging
import threading
from typing import Callable, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from cryptogen.telemetry import (DIRECTIONS, HE_OPS, KERNELS, MODES, PHASES, STAGES,
                                 TOKEN_LATENCY_BUCKETS, TRIPLE_KINDS, Counters, Gauges,
                                 Telemetry, TelemetrySnapshot, TokenHistogram)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9108
PREFIX = "cryptogen_"
log = logging.getLogger(__name__)

SnapshotSource = Union[Telemetry, Callable[[], TelemetrySnapshot]]


class MetricsPortInUse(OSError):
    """The metrics port is already taken by another process."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.message = (f"metrics port {port} on {host} is already in use: pass "
                        f"--metrics-port N to use another port, or --metrics-port 0 to pick a "
                        f"free port (the chosen port is then logged and exposed as "
                        f"MetricsExporter.port)")
        super().__init__(errno.EADDRINUSE, self.message)

    def __str__(self) -> str:
        return self.message


def _le(bound: float) -> str:
    return repr(float(bound))


class TelemetryCollector(Collector):
    """Reads a telemetry snapshot at scrape time and yields ``cryptogen_*`` families."""

    def __init__(self, source: SnapshotSource) -> None:
        self._snapshot = source.snapshot if isinstance(source, Telemetry) else source
        if not callable(self._snapshot):
            raise TypeError("source must be a Telemetry or a callable returning a snapshot")

    def describe(self) -> Iterator[Metric]:
        return self._families(Counters(), Gauges())

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        return self._families(snap.counters, snap.gauges)

    def _families(self, c: Counters, g: Gauges) -> Iterator[Metric]:
        yield self._token_latency(c)
        yield from self._counters(c)
        yield from self._gauges(g)

    @staticmethod
    def _token_latency(c: Counters) -> Metric:
        fam = HistogramMetricFamily(
            PREFIX + "token_latency_seconds",
            "Wall-clock latency of one generated token, by phase and cache mode.",
            labels=["phase", "mode"])
        for phase in PHASES:
            for mode in MODES:
                hist = c.token_latency.get((phase, mode), TokenHistogram())
                cum = hist.cumulative()
                buckets = [(_le(b), cum[i]) for i, b in enumerate(TOKEN_LATENCY_BUCKETS)]
                buckets.append(("+Inf", cum[-1]))
                fam.add_metric([phase, mode], buckets, hist.total)
        return fam

    @staticmethod
    def _counters(c: Counters) -> Iterator[Metric]:
        def counter(name, doc, labels, values):
            fam = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for label_values, value in values:
                fam.add_metric(list(label_values), value)
            return fam

        tokens = c.tokens_by_mode()
        yield counter("tokens", "Generated tokens, by cache mode.", ["mode"],
                      [((m,), tokens.get(m, 0)) for m in MODES])
        yield counter("stage_seconds", "Seconds spent in each pipeline stage (top-level stages "
                      "partition a token; sub-stages overlap them).", ["stage"],
                      [((s,), c.stage_seconds.get(s, 0.0)) for s in STAGES])
        yield counter("he_operations", "Homomorphic operations, by kernel and operation.",
                      ["kernel", "op"], [((k, op), c.he_ops.get((k, op), 0))
                                         for k in KERNELS for op in HE_OPS])
        yield counter("transfer_bytes", "Bytes sent between client and server, by direction.",
                      ["direction"], [((d,), c.transfer_bytes.get(d, 0)) for d in DIRECTIONS])
        yield counter("protocol_rounds", "Client-server communication rounds.", [],
                      [((), c.rounds)])
        yield counter("refreshes", "Ciphertext noise refreshes (H2S then fresh S2H).", [],
                      [((), c.refreshes)])
        yield counter("correlated_randomness_produced", "Correlated randomness produced "
                      "(Beaver triples, shared random bits, matrix triples).", ["kind"],
                      [((k,), c.produced.get(k, 0)) for k in TRIPLE_KINDS])
        yield counter("correlated_randomness_consumed", "Correlated randomness consumed.",
                      ["kind"], [((k,), c.consumed.get(k, 0)) for k in TRIPLE_KINDS])

    @staticmethod
    def _gauges(g: Gauges) -> Iterator[Metric]:
        cts = GaugeMetricFamily(PREFIX + "kv_cache_ciphertexts",
                                "Ciphertexts in the encrypted KV cache, per worker.",
                                labels=["worker"])
        nbytes = GaugeMetricFamily(PREFIX + "kv_cache_bytes",
                                   "Bytes of the encrypted KV cache, per worker.",
                                   labels=["worker"])
        for worker in sorted(g.kv_cache):
            n, b = g.kv_cache[worker]
            cts.add_metric([worker], n)
            nbytes.add_metric([worker], b)
        yield cts
        yield nbytes
        yield GaugeMetricFamily(PREFIX + "active_sessions", "Open generation sessions.",
                                value=g.active_sessions)


class MetricsExporter:
    """Serves ``/metrics`` for a telemetry source over HTTP.

    ``MetricsExporter(telemetry, host="127.0.0.1", port=9108).start()``; ``port=0`` picks a free
    port (read the real one from :attr:`port` after :meth:`start`). Also a context manager.
    """

    def __init__(self, telemetry: SnapshotSource, host: str = DEFAULT_HOST,
                 port: int = DEFAULT_PORT) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError("metrics port must be an int in 0..65535 (0 = pick a free port)")
        self.host = host
        self._requested_port = port
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(TelemetryCollector(telemetry))
        self._server = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        if self._server is not None:
            return self._server.server_address[1]
        return self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> "MetricsExporter":
        if self._server is not None:
            return self
        try:
            self._server, self._thread = start_http_server(
                self._requested_port, addr=self.host, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(self.host, self._requested_port) from None
            raise
        log.info("serving metrics at %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "MetricsExporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
