"""Server restart (issue #13): the ``cryptogen serve`` process dies while a client is mid-generation
(SIGTERM: the graceful stop; SIGKILL of its whole process group: a crash). The client must end
with a clear one-line error within a bounded time (nothing hangs), no server process may be left
behind, and a server started again (same state folder: same certificate and API key, same address)
serves a new client correctly, with the connection file from before the restart.

Cost: three server start-ups (the SIGTERM'd one, a restarted one that is then SIGKILL'd, and a last
one), two clients killed after their first token and one 1-token session (dealer provider).
"""
import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest

from conftest import PROMPTS, ServerProcess, alive, process_tree

from cryptogen.client.remote import ConnectError, connect
from cryptogen.net.control import RemoteError

pytestmark = pytest.mark.slow

# The client retries a dropped connection for ``client.remote.RESUME_WAIT`` (10 s) before it gives up
# (a server that comes back at once would resume the session); the rest is the margin for noticing that
# the worker's data link is gone and for a loaded 2-core machine.
ERROR_WITHIN = 20.0
GONE = re.compile(r"server.*(went away|shutting down|gone|lost|closed|stopp)|connection.*(lost|closed)|"
                  r"closed the connection", re.I)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Restarts:
    """Servers started one after another on one address and one state folder (a restart)."""

    def __init__(self, folder, tmp, dealer):
        self.folder, self.tmp, self.dealer = folder, tmp, dealer
        self.listen = f"127.0.0.1:{_free_port()}"
        self.servers: list[ServerProcess] = []
        self.current: ServerProcess | None = None
        self.first_conn_file = tmp / "server-first.json"  # what a client kept from before the restarts

    def start(self) -> ServerProcess:
        (self.tmp / "server.json").unlink(missing_ok=True)  # else the old one is taken for the new one's
        s = ServerProcess(self.folder, self.tmp, workers=1, max_sessions=2, dealer=self.dealer, listen=self.listen)
        if not self.first_conn_file.exists():
            shutil.copy(s.conn_file, self.first_conn_file)
        self.servers.append(s)
        self.current = s
        return s

    def stop_all(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                s.stop()


@pytest.fixture(scope="module")
def restarts(tiny_folder, dealer, tmp_path_factory):
    r = Restarts(tiny_folder, tmp_path_factory.mktemp("restart"), dealer)
    yield r
    r.stop_all()


def _client_mid_generation(conn_file, dealer, prompt) -> tuple[threading.Thread, dict, threading.Event]:
    """A client thread generating many tokens; the event is set once its first token is out."""
    first, res = threading.Event(), {"tokens": []}

    def run():
        try:
            with connect(conn_file, dealer=dealer.client_file) as c:
                for t in c.generate(prompt, 30, provider="dealer"):
                    res["tokens"].append(t)
                    first.set()
        except BaseException as e:  # noqa: BLE001 - asserted by the test
            res["error"], res["t_error"] = e, time.monotonic()
        finally:
            first.set()

    th = threading.Thread(target=run, daemon=True, name="client-mid-generation")
    th.start()
    return th, res, first


def _kill_mid_generation(server: ServerProcess, dealer, greedy, prompt, kill) -> tuple[BaseException, float]:
    t0 = time.monotonic()
    th, res, first = _client_mid_generation(server.conn_file, dealer, prompt)
    assert first.wait(180), "the client got no first token"
    t_first = time.monotonic() - t0
    assert res["tokens"] == greedy(prompt, 1), res  # the server served this client correctly until now
    t_kill = time.monotonic()
    kill()
    th.join(ERROR_WITHIN + 30)  # never hang the suite, whatever the client does
    assert not th.is_alive(), f"the client still hangs {time.monotonic() - t_kill:.0f} s after the server died"
    err = res.get("error")
    assert err is not None, f"the client ended without an error after the server died: {res['tokens']}"
    took = res["t_error"] - t_kill
    print(f"\nfirst token after {t_first:.1f} s; the server killed; the client's {type(err).__name__} "
          f"{took:.1f} s later: {err}")
    # a project error the CLI prints as one "error: ..." line (RemoteError/ConnectError/ValueError),
    # saying that the server went away, with no traceback or multi-line text in it
    assert isinstance(err, (RemoteError, ConnectError, ValueError)), f"{type(err).__mro__}: {err}"
    text = str(err)
    assert "\n" not in text and "Traceback" not in text and len(text) < 500, text
    assert GONE.search(text), f"the message does not say the server went away: {text!r}"
    assert took < ERROR_WITHIN, f"the client's error came {took:.1f} s after the server died"
    return err, took


def _tree_gone(pids, within: float) -> list[int]:
    deadline = time.monotonic() + within
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)


def test_sigterm_mid_generation_ends_the_client_with_one_line_and_the_server_restarts(restarts, dealer, greedy):
    s = restarts.start()
    tree = process_tree(s.proc.pid)
    assert any(cmd.startswith("ray::WorkerActor") for cmd in tree.values()), tree
    err, took = _kill_mid_generation(s, dealer, greedy, PROMPTS[0], lambda: s.proc.send_signal(signal.SIGTERM))
    # KNOWN GAP (client/remote.py, not this file's): on SIGTERM the gateway sends the client an error
    # {code: "shutdown"} and it arrives (queued in the control channel's inbox before the EOF), but
    # ``_Session._verdict`` sees ``chan.peer_gone`` and calls ``_resume`` at once, which aborts the channel
    # (dropping the queued message) and redials the dead address for RESUME_WAIT (10 s): the user gets
    # "the connection to the server was lost ..." after ~10 s instead of "the server is shutting down ..."
    # at once. Once fixed, tighten to:
    #     assert isinstance(err, RemoteError) and err.code == "shutdown" and took < 5
    assert isinstance(err, (RemoteError, ConnectError))
    t0 = time.monotonic()
    assert s.proc.wait(60) == 0  # the graceful stop: exit status 0
    assert not _tree_gone([s.proc.pid, *tree], 30), "Ray/worker processes outlived the stopped server"
    print(f"the server and its {len(tree)} Ray processes were gone {time.monotonic() - t0:.1f} s after the error")
    assert "stopping" in s.log.read_text(errors="replace")
    restarts.start()  # the next test's server: it serves a client correctly before it is killed in turn


def test_sigkill_of_the_process_group_mid_generation_then_a_new_server_serves(restarts, dealer, greedy):
    s = restarts.current if restarts.current is not None and restarts.current.proc.poll() is None \
        else restarts.start()
    tree = process_tree(s.proc.pid)
    _kill_mid_generation(s, dealer, greedy, PROMPTS[1], lambda: os.killpg(s.proc.pid, signal.SIGKILL))
    s.proc.wait(10)
    t0 = time.monotonic()
    # the worker actors run in process groups of their own; they must still die with their raylet
    assert not _tree_gone(tree, 30), {p: tree[p] for p in alive(tree)}
    print(f"its {len(tree)} Ray processes were gone {time.monotonic() - t0:.1f} s after the error")

    restarts.start()  # same address, certificate and API key: the client's old connection file works
    with connect(restarts.first_conn_file, dealer=dealer.client_file) as c:
        assert list(c.generate(PROMPTS[2], 1, provider="dealer")) == greedy(PROMPTS[2], 1)
