"""The embedded default: a ``cryptogen serve`` in its own OS process (its own embedded Ray), on
loopback, for one command. The user's process stays the client only and talks to it over the
same TLS links as to a remote server; its state folder (certificate, API key) and connection
file live in a private temporary folder removed afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 900.0


class LocalServerError(RuntimeError):
    """The local server did not start."""


class LocalServer:
    def __init__(self, model: str, workers: int = 1, address: str | None = None, max_sessions: int = 4,
                 extra: list[str] | None = None):
        self.model, self.workers, self.address, self.max_sessions = model, workers, address, max_sessions
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.metrics_url: str | None = None
        self._tmp = None

    def start(self) -> "LocalServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="cryptogen-local-")
        d = Path(self._tmp.name)
        os.chmod(d, 0o700)
        self.connection_file = d / "server.json"
        cmd = [sys.executable, "-m", "cryptogen.cli", "serve", "--model", self.model, "--workers", str(self.workers),
               "--listen", "127.0.0.1:0", "--connection-file", str(self.connection_file),
               "--state-dir", str(d / "state"), "--max-sessions", str(self.max_sessions), *self.extra]
        if self.address:
            cmd += ["--address", self.address]
        self.log = d / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        shown = 0
        while not self.connection_file.exists():
            shown = self._relay(shown)
            if self.proc.poll() is not None:
                self._relay(shown)
                raise LocalServerError(f"the local server exited during start-up: {self._last_line()}")
            if time.monotonic() > deadline:
                self.stop()
                raise LocalServerError(f"the local server did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.2)
        self._relay(shown)
        import re
        m = re.search(r"metrics at (http://\S+/metrics)", self.log.read_text(errors="replace"))
        self.metrics_url = m.group(1) if m else None  # with --metrics-port in ``extra``
        return self

    def _relay(self, shown: int) -> int:
        """Show the server's progress lines (``[serve] ...``) on this process's stderr."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return shown
        for line in lines[shown:]:
            if line.startswith("[serve]") or line.startswith("error:"):
                print(line, file=sys.stderr, flush=True)
        return len(lines)

    def _last_line(self) -> str:
        try:
            lines = [l for l in self.log.read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return "no log"
        errs = [l for l in lines if l.startswith("error:")]
        return (errs or lines or ["no output"])[-1][:300]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
