"""Run statistics for CryptoGen, collected apart from any exporter.

A :class:`Telemetry` collector is plain Python: thread-safe (one lock), no Prometheus import, and
its :meth:`Telemetry.snapshot` returns a :class:`TelemetrySnapshot`, a picklable value object that
crosses Ray actor boundaries. The exporter (``cryptogen.exporter``) reads a snapshot at
scrape time.

Merge semantics (counters stay monotonic, nothing is counted twice):

* Every collector has a ``source`` name (e.g. ``"client"``, ``"worker-0"``) and a random
  ``instance`` id made at construction. A snapshot carries both, plus a ``seq`` number that grows
  with each snapshot the collector takes. Snapshots hold **cumulative totals**, never deltas.
* ``collector.merge(snap)`` keeps only the latest snapshot per source (higher ``seq`` wins; an
  equal or lower ``seq`` is a duplicate or stale and is ignored). Merging the same worker's
  successive snapshots therefore never double counts.
* When a source comes back with a new ``instance`` (the actor restarted and its counters began
  again at zero), the old instance's counters are folded into a retired total first, so the
  merged counters never go down. Late snapshots of a retired instance are ignored.
* Gauges (KV cache per worker, active sessions) are not retired: a restarted source's old
  gauges are replaced by the new ones. ``kv_cache`` is keyed by worker label (each worker label
  should be reported by one source); ``active_sessions`` is summed over the live sources.
* ``snapshot()`` of a collector includes what it merged, so merging is hierarchical (workers ->
  driver -> client); just never merge one source along two paths.

Labels are validated against fixed, small sets. A rejected label raises ``ValueError`` whose
message lists the allowed values but never echoes the rejected value (it could be secret text).
"""
from __future__ import annotations

import math
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, Tuple

TOP_STAGES = ("embed", "layernorm", "attention", "mlp", "head", "pick")
SUB_STAGES = ("linear", "softmax", "gelu", "truncation", "refresh", "transfer")
STAGES = TOP_STAGES + SUB_STAGES
PHASES = ("prefill", "decode")
MODES = ("kv-reuse", "recompute")
KERNELS = ("linear", "attention", "embed", "lm_head")
HE_OPS = ("ct_pt_mul", "ct_ct_mul", "rotation")
TRIPLE_KINDS = ("triple", "bits", "tbits", "matrix")
DIRECTIONS = ("to_server", "to_client")
# Upper bounds (seconds) of the token-latency histogram; +Inf is implicit.
TOKEN_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                         60.0, 120.0, 300.0, 600.0)
MAX_WORKERS = 4096
_WORKER_RE = re.compile(r"^(?:w|worker[-_]?)?(\d{1,4})$")

HistKey = Tuple[str, str]  # (phase, mode)


def _check_label(kind: str, value: object, allowed: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {kind} label (got a {type(value).__name__}); "
                         f"allowed: {', '.join(allowed)}")
    return value


def worker_label(worker: object) -> str:
    """Canonical low-cardinality worker label ``"w<N>"``.

    Accepts an int ``N`` or a string ``"N"``, ``"wN"``, ``"worker-N"``, ``"worker_N"``,
    ``"workerN"`` with ``0 <= N < MAX_WORKERS``; anything else raises ``ValueError``.
    """
    if isinstance(worker, bool):
        worker = None
    if isinstance(worker, int):
        n = worker
    elif isinstance(worker, str) and _WORKER_RE.match(worker):
        n = int(_WORKER_RE.match(worker).group(1))
    else:
        n = -1
    if not 0 <= n < MAX_WORKERS:
        raise ValueError("invalid worker label: use a worker index 0..%d, or 'w<N>' / "
                         "'worker-<N>'" % (MAX_WORKERS - 1))
    return f"w{n}"


def _check_seconds(seconds: object) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < 0:
        raise ValueError("seconds must be a finite number >= 0")
    return float(seconds)


def _check_count(name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an int >= 0")
    return n


@dataclass(frozen=True)
class TokenHistogram:
    """Per-bucket (non-cumulative) counts; ``counts[-1]`` is the +Inf bucket."""
    counts: Tuple[int, ...] = (0,) * (len(TOKEN_LATENCY_BUCKETS) + 1)
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> "TokenHistogram":
        idx = next((i for i, b in enumerate(TOKEN_LATENCY_BUCKETS) if seconds <= b),
                   len(TOKEN_LATENCY_BUCKETS))
        counts = list(self.counts)
        counts[idx] += 1
        return TokenHistogram(tuple(counts), self.total + seconds, self.count + 1)

    def __add__(self, other: "TokenHistogram") -> "TokenHistogram":
        counts = tuple(a + b for a, b in zip(self.counts, other.counts))
        return TokenHistogram(counts, self.total + other.total, self.count + other.count)

    def cumulative(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return tuple(out)


@dataclass(frozen=True)
class Counters:
    """The monotonic part of a snapshot (everything that only grows)."""
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    token_latency: Dict[HistKey, TokenHistogram] = field(default_factory=dict)
    he_ops: Dict[Tuple[str, str], int] = field(default_factory=dict)   # (kernel, op)
    transfer_bytes: Dict[str, int] = field(default_factory=dict)       # direction
    rounds: int = 0
    refreshes: int = 0
    produced: Dict[str, int] = field(default_factory=dict)             # triple kind
    consumed: Dict[str, int] = field(default_factory=dict)

    def __add__(self, o: "Counters") -> "Counters":
        return Counters(
            stage_seconds=_add_maps(self.stage_seconds, o.stage_seconds),
            token_latency=_add_maps(self.token_latency, o.token_latency),
            he_ops=_add_maps(self.he_ops, o.he_ops),
            transfer_bytes=_add_maps(self.transfer_bytes, o.transfer_bytes),
            rounds=self.rounds + o.rounds,
            refreshes=self.refreshes + o.refreshes,
            produced=_add_maps(self.produced, o.produced),
            consumed=_add_maps(self.consumed, o.consumed))

    def tokens_by_mode(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for (_phase, mode), hist in self.token_latency.items():
            out[mode] = out.get(mode, 0) + hist.count
        return out


@dataclass(frozen=True)
class Gauges:
    """The point-in-time part of a snapshot."""
    kv_cache: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # worker -> (cts, bytes)
    active_sessions: int = 0

    def __add__(self, o: "Gauges") -> "Gauges":
        return Gauges({**self.kv_cache, **o.kv_cache},
                      self.active_sessions + o.active_sessions)


@dataclass(frozen=True)
class TelemetrySnapshot:
    """Cumulative totals of one collector (including what it merged) at one moment."""
    source: str
    instance: str
    seq: int
    counters: Counters = field(default_factory=Counters)
    gauges: Gauges = field(default_factory=Gauges)
    taken_at: float = 0.0  # time.time() when taken; informational only

    def as_dict(self) -> dict:
        """A JSON-friendly view (tuple keys joined with '/')."""
        c, g = self.counters, self.gauges
        return {
            "source": self.source, "instance": self.instance, "seq": self.seq,
            "stage_seconds": dict(c.stage_seconds),
            "tokens": {f"{p}/{m}": {"count": h.count, "sum": h.total}
                       for (p, m), h in c.token_latency.items()},
            "he_ops": {f"{k}/{op}": n for (k, op), n in c.he_ops.items()},
            "transfer_bytes": dict(c.transfer_bytes), "rounds": c.rounds,
            "refreshes": c.refreshes, "produced": dict(c.produced),
            "consumed": dict(c.consumed),
            "kv_cache": {w: {"ciphertexts": n, "bytes": b} for w, (n, b) in g.kv_cache.items()},
            "active_sessions": g.active_sessions,
        }


def _add_maps(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


class Telemetry:
    """Thread-safe collector of one process's (or actor's) run statistics."""

    def __init__(self, source: str = "client") -> None:
        if not isinstance(source, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$", source):
            raise ValueError("source must be a short identifier ([A-Za-z][A-Za-z0-9_.-]*)")
        self.source = source
        self.instance = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._seq = 0
        self._counters = Counters()
        self._gauges = Gauges()
        self._children: Dict[str, TelemetrySnapshot] = {}
        self._retired = Counters()
        self._retired_instances: set = set()

    # -- recording ---------------------------------------------------------------------------
    def _bump(self, **changes: Counters) -> None:
        with self._lock:
            self._counters = self._counters + Counters(**changes)

    def add_stage_time(self, stage: str, seconds: float) -> None:
        _check_label("stage", stage, STAGES)
        self._bump(stage_seconds={stage: _check_seconds(seconds)})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block and add it to ``name`` (also when the block raises)."""
        _check_label("stage", name, STAGES)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_stage_time(name, time.perf_counter() - start)

    def token(self, phase: str, mode: str, seconds: float) -> None:
        """One generated token: its wall-clock latency in ``phase`` under ``mode``."""
        key = (_check_label("phase", phase, PHASES), _check_label("mode", mode, MODES))
        seconds = _check_seconds(seconds)
        with self._lock:
            hist = self._counters.token_latency.get(key, TokenHistogram()).observe(seconds)
            latency = {**self._counters.token_latency, key: hist}
            self._counters = replace(self._counters, token_latency=latency)

    def he_ops(self, kernel: str, ct_pt: int = 0, ct_ct: int = 0, rotations: int = 0) -> None:
        _check_label("kernel", kernel, KERNELS)
        counts = (_check_count("ct_pt", ct_pt), _check_count("ct_ct", ct_ct),
                  _check_count("rotations", rotations))
        self._bump(he_ops={(kernel, op): n for op, n in zip(HE_OPS, counts)})

    def traffic(self, bytes_to_server: int = 0, bytes_to_client: int = 0, rounds: int = 0) -> None:
        self._bump(transfer_bytes={
            "to_server": _check_count("bytes_to_server", bytes_to_server),
            "to_client": _check_count("bytes_to_client", bytes_to_client)},
            rounds=_check_count("rounds", rounds))

    def refreshes(self, n: int = 1) -> None:
        self._bump(refreshes=_check_count("n", n))

    def triples(self, kind: str, produced: int = 0, consumed: int = 0) -> None:
        _check_label("kind", kind, TRIPLE_KINDS)
        self._bump(produced={kind: _check_count("produced", produced)},
                   consumed={kind: _check_count("consumed", consumed)})

    def kv_cache(self, worker: object, ciphertexts: int, nbytes: int) -> None:
        """Set (gauge) the KV cache size a worker holds now."""
        label = worker_label(worker)
        value = (_check_count("ciphertexts", ciphertexts), _check_count("nbytes", nbytes))
        with self._lock:
            self._gauges = replace(self._gauges, kv_cache={**self._gauges.kv_cache, label: value})

    def sessions(self, active: int) -> None:
        """Set (gauge) the number of generation sessions open in this source."""
        active = _check_count("active", active)
        with self._lock:
            self._gauges = replace(self._gauges, active_sessions=active)

    # -- snapshot / merge --------------------------------------------------------------------
    def snapshot(self) -> TelemetrySnapshot:
        """Cumulative totals: own records + retired instances + latest snapshot per source."""
        with self._lock:
            self._seq += 1
            counters = self._counters + self._retired
            gauges = Gauges()
            for child in self._children.values():
                counters = counters + child.counters
                gauges = gauges + child.gauges
            gauges = gauges + self._gauges
            return TelemetrySnapshot(self.source, self.instance, self._seq, counters, gauges,
                                     time.time())

    def merge(self, snap: TelemetrySnapshot) -> bool:
        """Fold in another collector's snapshot; True if it changed anything.

        Keeps the latest snapshot per ``snap.source``; stale/duplicate snapshots (same instance,
        ``seq`` not higher) and snapshots of retired instances are ignored.
        """
        if not isinstance(snap, TelemetrySnapshot):
            raise TypeError("merge() takes a TelemetrySnapshot")
        if snap.instance == self.instance:
            raise ValueError("cannot merge a collector's own snapshot into itself")
        with self._lock:
            if snap.instance in self._retired_instances:
                return False
            old = self._children.get(snap.source)
            if old is not None and old.instance == snap.instance:
                if snap.seq <= old.seq:
                    return False
            elif old is not None:
                self._retired = self._retired + old.counters
                self._retired_instances.add(old.instance)
            self._children[snap.source] = snap
            return True

    def sources(self) -> Tuple[str, ...]:
        """Names of the sources merged so far (not including this collector)."""
        with self._lock:
            return tuple(sorted(self._children))

    def __reduce__(self):
        raise TypeError("Telemetry collectors are per process and not picklable: send "
                        "collector.snapshot() across actor boundaries and merge() it there")
