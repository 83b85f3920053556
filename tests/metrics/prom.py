"""Test helper (not a test): run a REAL Prometheus server on 127.0.0.1 for the metrics tests.

``prometheus`` is a pytest fixture that yields ``start(targets) -> PrometheusServer``; every
server it started is stopped at teardown. Each server gets a temp config that scrapes the given
``host:port`` targets every second, a temp TSDB dir, and a free loopback port. The binary is the
Debian package's ``/usr/bin/prometheus`` (``tools/install-prometheus.sh``); if it is missing the
fixture FAILS, it does not skip.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, List, Optional

import pytest

PROMETHEUS_BIN = os.environ.get("CRYPTOGEN_PROMETHEUS_BIN", "/usr/bin/prometheus")
JOB = "cryptogen"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(targets: List[str], interval: str) -> str:
    quoted = ", ".join(f'"{t}"' for t in targets)
    return (f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    scrape_interval: {interval}\n"
            f"    scrape_timeout: {interval}\n    static_configs:\n"
            f"      - targets: [{quoted}]\n")


class PrometheusServer:
    """One Prometheus process on 127.0.0.1 with its own config and storage."""

    def __init__(self, targets: List[str], workdir: Path, interval: str = "1s") -> None:
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(_config(targets, interval))
        self.log_path = workdir / "prometheus.log"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "PrometheusServer":
        for _attempt in range(3):                  # a port picked free can be taken meanwhile
            self.port = _free_port()
            self._log = self._log or open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [PROMETHEUS_BIN, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=self._log,
                stdin=subprocess.DEVNULL)
            if self._wait_ready(timeout):
                return self
            self._terminate()
            if "address already in use" not in self.log_tail():
                break
        self.stop()
        raise RuntimeError(f"Prometheus did not become ready; log tail:\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def query(self, promql: str) -> list:
        """Instant query via /api/v1/query; returns the result vector (raises on error)."""
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise ValueError(f"query failed: {promql!r}: {body.get('error', body)}")
        return body["data"]["result"]

    def value(self, promql: str) -> Optional[float]:
        """Sum of an instant vector's values (None when the vector is empty)."""
        result = self.query(promql)
        if not result:
            return None
        return sum(float(r["value"][1]) for r in result)

    def wait_until(self, promql: str, predicate: Callable[[Optional[float]], bool],
                   timeout: float = 15.0) -> Optional[float]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.value(promql)
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {promql!r} (last value {got}); "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)


def require_prometheus(binary: str = PROMETHEUS_BIN) -> None:
    """Fail (never skip) the calling test when the Prometheus binary is missing."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} not found: the real-Prometheus test needs it. Install it with "
                    f"`bash tools/install-prometheus.sh` (Debian package 'prometheus'), or point "
                    f"CRYPTOGEN_PROMETHEUS_BIN at a prometheus binary.", pytrace=False)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """Yields ``start(targets, interval='1s') -> PrometheusServer``; stops them at the end of
    the module (start one server per module and share it: startup costs ~1-2 s)."""
    require_prometheus()
    servers: List[PrometheusServer] = []

    def start(targets: List[str], interval: str = "1s") -> PrometheusServer:
        server = PrometheusServer(targets, tmp_path_factory.mktemp("prometheus"), interval)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
