"""A real ``cryptogen serve`` in its own OS process (embedded Ray) over a tiny checkpoint, a
third-party dealer, and helpers to read the server's own counts from its metrics endpoint."""
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny import greedy as plain_greedy, save_tiny

from cryptogen.model import GPT
PROMPTS = ([3, 17], [9, 100, 4], [42, 7, 19])  # top-2 logit margins >= 0.06 over 6 tokens
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def greedy(tiny_folder):
    model = GPT.from_pretrained(tiny_folder).eval()
    return lambda prompt, n: plain_greedy(model, prompt, n)


class ServerProcess:
    def __init__(self, folder: Path, tmp: Path, workers: int = 1, max_sessions: int = 4, dealer=None,
                 idle_timeout: float = 120.0, listen: str = "127.0.0.1:0", extra=(), env=None):
        self.conn_file, self.log = tmp / "server.json", tmp / "serve.log"
        cmd = [sys.executable, "-m", "cryptogen.cli", "serve", "--model", str(folder), "--workers", str(workers),
               "--listen", listen, "--connection-file", str(self.conn_file), "--state-dir", str(tmp / "state"),
               "--max-sessions", str(max_sessions), "--metrics-port", "0", "--idle-timeout", str(idle_timeout),
               *(["--dealer", str(dealer.server_file)] if dealer is not None else []), *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, start_new_session=True, env=env)
        deadline = time.monotonic() + 240
        while True:
            m = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", self.log.read_text(errors="replace"))
            if m and self.conn_file.exists():
                self.metrics_port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start: " + self.log.read_text(errors="replace")[-2000:])
            time.sleep(0.2)

    def metrics(self) -> dict:
        """The server's own counts: metric line -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, pred, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.metrics().get(name)
            if v is not None and pred(v):
                return v
            if time.monotonic() > deadline:
                return v
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_folder, dealer, tmp_path_factory):
    s = ServerProcess(tiny_folder, tmp_path_factory.mktemp("serve"), workers=1, max_sessions=4, dealer=dealer)
    yield s
    s.stop()


def run_client(code: str, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """Run client code in its own process where Ray cannot be imported."""
    prelude = "import sys\nsys.modules['ray'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


# ---- process trees of a server (load, soak and restart tests): /proc only, no psutil ----------
def process_tree(root: int) -> dict:
    """{pid: command line} of ``root``'s live descendants (its Ray processes and worker actors)."""
    procs = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            procs[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), cmd)
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in out:
                out[pid] = cmd
                todo.append(pid)
    return out


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def cpu_seconds(pids) -> dict:
    """{pid: user+system CPU seconds so far} of live ``pids`` (0: this process)."""
    out = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out
