"""The real deployment path: ``ray start --head`` (Ray's own CLI, token authentication on), then
``cryptogen serve --address 127.0.0.1:PORT`` joining it as a separate program, then a client
process where Ray cannot be imported, over TLS on loopback. Plus the one-line, fast errors when
the Ray token is missing or wrong, or when the address is not a Ray cluster.

The Ray head gets a private --temp-dir, free ports and a private HOME (its token in
HOME/.ray/auth_token, as `ray get-auth-token --generate` would write it); the test stops exactly
the processes it started (never `ray stop`: other Ray instances may be running on this machine).
"""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny import greedy as plain_greedy, save_tiny

from cryptogen.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
PROMPT, NEW = [3, 17], 2  # a prefill and one cached decode step (top-2 margins >= 0.1)
FAST = 30.0  # seconds: generous bound for a one-line error (Ray's own retry loop takes 20 s or more)

pytestmark = [pytest.mark.slow]
try:
    import pytest_timeout  # noqa: F401
    pytestmark.append(pytest.mark.timeout(300))
except ImportError:  # every wait below has its own deadline
    pass


# -- helpers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, **extra) -> dict:
    """The environment of a child: no inherited Ray address or auth settings, a private HOME."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(roots: set[int]) -> set[int]:
    """roots and every process below them (by parent pid)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parent = {p: _ppid(p) for p in pids}
    out, grew = set(roots), True
    while grew:
        grew = False
        for p, pp in parent.items():
            if pp in out and p not in out:
                out.add(p)
                grew = True
    return out


def kill_pids(pids: set[int], grace: float = 5.0) -> None:
    pids = {p for p in pids if p != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "(Z)" not in _state(p)}
            if not pids:
                return
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    except (OSError, IndexError):
        return "(Z)"


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The shared tiny random GPT-2 checkpoint (tests/tiny.py)."""
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    return plain_greedy(GPT.from_pretrained(folder).eval(), prompt, n)


class RayHead:
    """``ray start --head`` on loopback with token authentication, private temp dir and ports."""

    def __init__(self, tmp: Path, auth_mode: str = "token"):
        self.tmp, self.home = tmp, tmp / "home"
        (self.home / ".ray").mkdir(parents=True)
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
        tok = self.home / ".ray" / "auth_token"
        tok.write_text(self.token)
        tok.chmod(0o600)
        self.roots: set[int] = set()
        # A second attempt (fresh ports, fresh temp dir) when the first fails: on a loaded 2-core
        # machine Ray's own 30 s wait for its raylet to register can run out (CI saw it once).
        for attempt in (1, 2):
            rc = self._start(auth_mode, attempt)
            if rc == 0:
                break
            why = f"`ray start --head` failed (rc {rc}, attempt {attempt}):\n{tail(self.log)}\n{self._ray_logs()}"
            self.stop()
            if attempt == 2:
                pytest.fail(why)
            print(why, file=sys.stderr)
        self.raylet = next((p for p in self.own_pids() if "/raylet/raylet " in _cmdline(p)), None)

    def _start(self, auth_mode: str, attempt: int) -> int | None:
        self.temp_dir = Path(f"/tmp/cgray-{os.getpid()}-{secrets.token_hex(3)}")  # short: Unix socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.tmp / f"ray-start-{attempt}.log"
        ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
                 "--ray-client-server-port": free_port(), "--dashboard-port": free_port(),
                 "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.temp_dir}", "--num-cpus=2", "--disable-usage-stats",
               "--include-dashboard=false", *(f"{k}={v}" for k, v in ports.items())]
        # RAY_AUTH_MODE=token: what `ray start --head` does by itself when it finds a token
        # (e.g. the ~/.ray/auth_token an embedded ray.init() wrote); explicit here, so that the
        # cluster under test surely has token authentication.
        env = clean_env(self.home, RAY_AUTH_MODE=auth_mode)
        with open(self.log, "wb") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        self.roots.add(p.pid)
        try:
            rc = p.wait(180)
        except subprocess.TimeoutExpired:
            rc = None
        self.roots |= self.own_pids()
        return rc

    def _ray_logs(self) -> str:
        """The ends of the GCS's and raylet's own logs (why a start failed)."""
        logs = sorted({f.resolve() for f in self.temp_dir.glob("session_*/logs/*")}) if self.temp_dir.exists() else []
        return "\n".join(f"--- {f.name}:\n{tail(f, 1500)}" for f in logs
                         if f.name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err"))

    def own_pids(self) -> set[int]:
        """The Ray processes of this head: those naming its private temp dir, and their children."""
        mine = {int(p) for p in os.listdir("/proc") if p.isdigit() and str(self.temp_dir) in _cmdline(int(p))}
        return descendants(mine)

    def stop(self) -> None:
        kill_pids(descendants(self.roots | self.own_pids()))
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("rayhead"))
    yield head
    head.stop()


class Serve:
    def __init__(self, folder: Path, tmp: Path, env: dict, address: str | None, listen: str = "127.0.0.1:0",
                 workers: int = 1):
        self.conn_file, self.log = tmp / "server.json", tmp / "serve.log"
        cmd = [sys.executable, "-m", "cryptogen.cli", "serve", "--model", str(folder), "--workers", str(workers),
               "--listen", listen, "--connection-file", str(self.conn_file), "--state-dir", str(tmp / "state"),
               "--max-sessions", "2", "--idle-timeout", "120", *(["--address", address] if address else [])]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)
        deadline = time.monotonic() + 200
        while not (self.conn_file.exists() and "[serve] serving" in tail(self.log, 100000)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = tail(self.log)
                self.stop()
                pytest.fail(f"cryptogen serve did not start:\n{out}")
            time.sleep(0.3)

    def stop(self) -> None:
        pids = descendants({self.proc.pid})
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        kill_pids({p for p in pids if Path(f"/proc/{p}").exists()}, grace=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def run_client(conn_file: Path, prompt, n: int, env: dict, timeout: float = 240) -> list[int]:
    """A client in its own process where Ray cannot be imported."""
    code = f"""
import sys
sys.modules['ray'] = None
import json
from cryptogen.client.remote import connect
with connect({str(conn_file)!r}) as c:
    out = list(c.generate({list(prompt)!r}, {n}))
assert sys.modules['ray'] is None
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def serve_error(folder: Path, tmp: Path, env: dict, address: str) -> tuple[list[str], float, str]:
    """``cryptogen serve --address`` expected to fail: (its output lines, seconds, full stderr)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cryptogen.cli", "serve", "--model", str(folder), "--address", address,
                        "--listen", "127.0.0.1:0", "--connection-file", str(tmp / "server.json"),
                        "--state-dir", str(tmp / "state")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and not l.startswith("[serve]")]
    assert not (tmp / "server.json").exists()
    return lines, elapsed, r.stderr


def assert_one_line_error(lines, elapsed, stderr, *needles):
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr and "WARNING" not in stderr and "InvalidAuthToken" not in stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert elapsed < FAST, f"took {elapsed:.1f} s"


# -- tests ----------------------------------------------------------------------------------------

def test_serve_joins_ray_start_cluster_with_token_auth_and_client_without_ray_gets_greedy(
        ray_head, tiny_folder, tmp_path):
    """The user's path: `ray start --head` (token auth on, token in ~/.ray/auth_token), then
    `cryptogen serve --address 127.0.0.1:PORT` with RAY_AUTH_MODE unset, as a separate program."""
    import grpc
    from cryptogen.cluster.connect import _gcs_call
    assert _gcs_call(ray_head.address, None) == grpc.StatusCode.UNAUTHENTICATED  # token auth is on
    assert _gcs_call(ray_head.address, ray_head.token) is None
    env = clean_env(ray_head.home)
    server = Serve(tiny_folder, tmp_path, env, ray_head.address)
    try:
        log = tail(server.log, 100000)
        assert f"starting Ray ({ray_head.address})" in log and "InvalidAuthToken" not in log
        # the worker actor runs under the `ray start` cluster's raylet, not an embedded Ray
        workers = [p for p in ray_head.own_pids() if "WorkerActor" in _cmdline(p)]
        assert workers, "no WorkerActor process under the ray start head"
        assert not any("gcs_server" in _cmdline(p) for p in descendants({server.proc.pid}))
        tokens = run_client(server.conn_file, PROMPT, NEW, clean_env(tmp_path))
        assert tokens == greedy(tiny_folder, PROMPT, NEW)
    finally:
        server.stop()


def test_token_in_environment_variable_also_joins(ray_head):
    """RAY_AUTH_TOKEN (the way to pass the token on a machine without ~/.ray/auth_token)."""
    code = ("from cryptogen.cluster.connect import connect, shutdown\n"
            f"info = connect({ray_head.address!r})\nprint(info.nodes, info.cpus)\nshutdown()\n")
    empty = ray_head.tmp / "empty-home"
    empty.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=clean_env(empty, RAY_AUTH_TOKEN=ray_head.token))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["1", "2.0"]


def test_cluster_without_token_auth_is_joined_by_a_driver_that_has_a_token(tmp_path):
    """`RAY_AUTH_MODE=disabled ray start --head`, and a driver whose ~/.ray/auth_token exists (any
    machine that once ran an embedded Ray): the probe finds no auth and the driver joins as is."""
    head = RayHead(tmp_path, auth_mode="disabled")
    try:
        code = ("import ray\nfrom cryptogen.cluster.connect import connect, shutdown\n"
                f"info = connect({head.address!r})\n"
                "print(ray.get(ray.remote(lambda: 41).remote()) + 1, info.nodes)\nshutdown()\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env=clean_env(head.home))  # head.home/.ray/auth_token exists
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split()[-2:] == ["42", "1"]
    finally:
        head.stop()


@pytest.mark.parametrize("case", ["missing", "wrong", "wrong-file", "unreadable-file"])
def test_missing_or_wrong_token_is_one_line_and_fast(ray_head, tiny_folder, tmp_path, case):
    home = tmp_path / "home"
    home.mkdir()
    extra = {}
    if case == "wrong":
        extra["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif case == "wrong-file":
        (tmp_path / "tok").write_text(secrets.token_hex(32) + "\n")
        extra["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "tok")
    elif case == "unreadable-file":
        extra["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-such-token")
    lines, elapsed, stderr = serve_error(tiny_folder, tmp_path, clean_env(home, **extra), ray_head.address)
    needle = {"missing": "no token was found", "wrong": "refused the token from RAY_AUTH_TOKEN",
              "wrong-file": "refused the token from RAY_AUTH_TOKEN_PATH=",
              "unreadable-file": "token file RAY_AUTH_TOKEN_PATH="}[case]
    assert_one_line_error(lines, elapsed, stderr, ray_head.address, needle, "RAY_AUTH_TOKEN", "ray get-auth-token")


def _silent_listener(sock, done):
    conns = []
    sock.settimeout(0.2)
    while not done.is_set():
        try:
            conns.append(sock.accept()[0])  # accepts and never answers
        except (socket.timeout, OSError):
            pass
    for c in conns:
        c.close()


def _http_listener(sock, done):
    sock.settimeout(0.2)
    while not done.is_set():
        try:
            c, _ = sock.accept()
        except (socket.timeout, OSError):
            continue
        try:
            c.settimeout(2)
            c.recv(4096)
            c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        c.close()


@pytest.mark.parametrize("kind", ["silent", "http", "closed"])
def test_address_without_ray_is_one_line_and_fast(tiny_folder, tmp_path, kind):
    """A port where a non-Ray listener answers (or that never answers), and one where nothing listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    th, done = None, threading.Event()
    if kind == "closed":
        sock.close()
    else:
        sock.listen(16)
        th = threading.Thread(target={"silent": _silent_listener, "http": _http_listener}[kind], args=(sock, done),
                              daemon=True)
        th.start()
    try:
        lines, elapsed, stderr = serve_error(tiny_folder, tmp_path, clean_env(tmp_path), f"127.0.0.1:{port}")
    finally:
        if th is not None:
            done.set()
            th.join(5)
            sock.close()
    needle = "cannot reach a Ray cluster" if kind == "closed" else "no Ray cluster answers"
    assert_one_line_error(lines, elapsed, stderr, f"127.0.0.1:{port}", needle)


def test_bad_address_is_one_line():
    from cryptogen.cluster.connect import ClusterError, check_cluster

    for bad in ("localhost", "127.0.0.1:notaport", ":6379"):
        with pytest.raises(ClusterError, match="is not HOST:PORT"):
            check_cluster(bad)
