"""The real client's control path against a fake server (``FakeServer``): each case answers one
message of the flow (``welcome``, ``session``, or an ``error`` in their place) with a mutated frame,
everything else honestly, and runs ``Connection`` + ``generate`` until they end.

Used by tests/fuzz/test_fuzz_client_control.py and scripts/fuzz.py."""
from __future__ import annotations

import threading

import numpy as np

import fuzz_helpers as fh
from cryptogen.net import control

PHASES = ("welcome", "session")  # the server's replies the client parses before any step


def link_listener(state_dir):
    """A fake worker: takes the link token, then hangs up (the client's handshake fails at once)."""
    srv = fh.FakeServer(state_dir)

    def script(chan):
        chan.timeout = 10.0
        chan.recv()
    srv.script = script
    return srv


def env_for(links_port: int) -> dict:
    return {"api_key": "k" * 64, "model": fh.tiny_model_hf(),
            "links": [{"worker": 0, "host": "127.0.0.1", "port": links_port,
                       "tokens": {"online": "a" * 64, "offline": "b" * 64}}]}


def control_script(phase: str, frame: np.ndarray, env: dict):
    """The fake gateway: honest replies except ``frame`` in place of the ``phase`` reply."""
    def script(chan):
        chan.timeout = 20.0
        control.recv(chan, "hello")
        if phase == "welcome":
            chan.send(frame)
        else:
            control.send(chan, "welcome", **fh.SERVER_MESSAGES["welcome"](env))
        while True:
            msg = control.recv(chan)
            if msg["type"] == "close":
                return
            if msg["type"] == "open":
                control.recv_blob(chan, 1 << 30, "public context")
                if phase == "session":
                    chan.send(frame)
                else:
                    control.send_error(chan, "busy", "the server is busy; retry after 30 s", retry_after=30)
    return script


def run_client(fake, keys, timeout: float = 60.0) -> BaseException | None:
    """Connect and generate one token against ``fake``; the exception the client raised (None: none).
    AssertionError if it does not end within ``timeout`` (a hang)."""
    from cryptogen.client import remote

    out = {}

    def go():
        try:
            c = remote.Connection(fake.info(), timeout=10.0)
            try:
                c._keys = keys
                list(c.generate([1, 2], 1))
            finally:
                c.close()
        except BaseException as e:  # noqa: BLE001 - classified by the caller
            out["error"] = e
    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"the client hangs (over {timeout:.0f} s)"
    return out.get("error")
