"""The gateway's session statistics (plain Python, thread-safe) and their Prometheus collector.

Kept apart from the exporter: the gateway counts, ``GatewayCollector`` reads a snapshot at scrape
time. Labels are fixed small sets (refusal reasons); nothing about a session's content is counted.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REFUSALS = ("auth", "busy", "bad_request")
RECOVERIES = ("worker", "resume")  # a step redone after a worker restart; a client's session resumed


@dataclass
class GatewayStats:
    open: int = 0
    opened: int = 0
    closed: int = 0
    timed_out: int = 0
    failed: int = 0
    refused: dict = field(default_factory=lambda: dict.fromkeys(REFUSALS, 0))
    recoveries: dict = field(default_factory=lambda: dict.fromkeys(RECOVERIES, 0))
    kv_max: int = 0  # the largest encrypted KV cache one session held (bytes, all workers)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def opening(self, limit: int) -> bool:
        """Count a new session unless ``limit`` are open (then count a busy refusal)."""
        with self._lock:
            if self.open >= limit:
                self.refused["busy"] += 1
                return False
            self.open += 1
            self.opened += 1
            return True

    def closing(self) -> None:
        with self._lock:
            self.open -= 1
            self.closed += 1

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def timeout(self) -> None:
        with self._lock:
            self.timed_out += 1

    def failure(self) -> None:
        with self._lock:
            self.failed += 1

    def recovered(self, kind: str) -> None:
        with self._lock:
            self.recoveries[kind] += 1

    def kv_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.kv_max = max(self.kv_max, int(nbytes))

    def as_dict(self) -> dict:
        with self._lock:
            return dict(open=self.open, opened=self.opened, closed=self.closed, timed_out=self.timed_out,
                        failed=self.failed, refused=dict(self.refused), recoveries=dict(self.recoveries),
                        kv_max=self.kv_max)


class GatewayCollector:
    def __init__(self, stats: GatewayStats):
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self.stats.as_dict()
        g = GaugeMetricFamily("cryptogen_server_sessions_open", "Secure sessions open on the server now.")
        g.add_metric([], s["open"])
        yield g
        yield self._counter("cryptogen_server_sessions", "Secure sessions opened on the server.", s["opened"])
        r = CounterMetricFamily("cryptogen_server_sessions_refused", "Connections or sessions refused, by reason.",
                                labels=["reason"])
        for reason in REFUSALS:
            r.add_metric([reason], s["refused"][reason])
        yield r
        yield self._counter("cryptogen_server_sessions_timed_out", "Sessions ended by the idle timeout.",
                            s["timed_out"])
        yield self._counter("cryptogen_server_sessions_failed", "Sessions ended by an error.", s["failed"])
        r = CounterMetricFamily("cryptogen_server_recoveries", "Sessions carried over a fault: a step redone after "
                                "a worker restart (worker), a dropped client's session resumed (resume).",
                                labels=["kind"])
        for kind in RECOVERIES:
            r.add_metric([kind], s["recoveries"][kind])
        yield r
        g = GaugeMetricFamily("cryptogen_server_session_kv_bytes_max",
                              "The largest encrypted KV cache one session has held, all workers (bytes).")
        g.add_metric([], s["kv_max"])
        yield g

    @staticmethod
    def _counter(name: str, doc: str, value: int) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc)
        c.add_metric([], value)
        return c
