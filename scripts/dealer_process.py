"""The dealer as its own process (``cryptogen dealer``), as it is deployed, for the benchmarks: started
on a free loopback port, its connection files read from its first line, stopped with SIGTERM."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class DealerProcess:
    """``server_file`` and ``client_file`` as a ``DealerServer``'s; ``pid`` for memory accounting."""

    def __init__(self, folder: Path, step_ahead_mib: int, timeout: float = 60.0):
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cryptogen.cli", "dealer", "--listen", "127.0.0.1:0", "--state-dir", str(folder),
             "--out", str(folder), "--step-ahead-mib", str(step_ahead_mib)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        deadline, line = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            m = re.search(r"connection files: client (\S+), server (\S+)$", line.strip())
            if m:
                self.client_file, self.server_file = Path(m[1]), Path(m[2])
                # the rest of its output is read and dropped: a full pipe would stop the dealer
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()
                return
        self.stop()
        raise RuntimeError(f"the dealer process did not start within {timeout:.0f} s (its last line: {line.strip()!r})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
