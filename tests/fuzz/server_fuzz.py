"""Fuzz cases against a real ``cryptogen serve`` (a ``ServerProcess``), and against the real client
with the server's frames mutated on arrival. Used by tests/fuzz/test_fuzz_server.py and
scripts/fuzz.py.

* ``control_case``: a fresh control connection sends a sequence of (mutated) frames, then ``close``;
  the server must answer with an ``error`` whose message is one line, or close, in time.
* ``context_case``: ``open`` with a (mutated / foreign / wrong-parameter) public context.
* ``session_case``: a real session (the real client's ``_Session``), then mutated control messages
  mid-session (forward fields, replays, foreign session ids, unknown types).
* ``link_case``: a real step with one data-link frame mutated, client -> server (the client's send
  tapped) or server -> client (the client's receive tapped).
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np

import fuzz_helpers as fh
from cryptogen.net import control

T = 4398044938241  # the field (HEConfig().t)
CASE_TIMEOUT = 60.0  # a case must end in this long (the server's replies go through Ray)
PROMPT = [9, 100, 4]


def info(srv) -> dict:
    return json.loads(srv.conn_file.read_text())


def dial(srv):
    from cryptogen.net.channel import dial as _dial
    d = info(srv)
    host, port = d["address"].rsplit(":", 1)
    return _dial(host, int(port), d["cert"], d["fingerprint"], max_frame=control.MAX_CONTROL + 4096)


def control_case(srv, frames, timeout: float = CASE_TIMEOUT) -> str:
    """Send ``frames`` on a new control connection, then a valid ``close``; the outcome."""
    from cryptogen.mpc.errors import ChannelError
    chan = dial(srv)
    try:
        for f in frames:
            chan.send(f)
        try:
            control.send(chan, "close")
        except ChannelError:
            pass
        outcome, _ = fh.read_outcome(chan, timeout)
        return outcome
    finally:
        chan.abort()


def hello_frames(srv, env=None) -> list:
    return [fh.encode({"type": "hello", **fh.CLIENT_MESSAGES["hello"](env or {"api_key": info(srv)["api_key"]})})]


def context_case(srv, blob: bytes, provider: str = "he", timeout: float = CASE_TIMEOUT) -> str:
    """hello, the welcome (until then the server takes small frames only), open, then ``blob`` as
    the public context."""
    from cryptogen.mpc.errors import ChannelError
    chan = dial(srv)
    try:
        chan.send(hello_frames(srv)[0])
        control.recv(chan, "welcome")
        control.send(chan, "open", mode="kv-reuse", provider=provider)
        control.send_blob(chan, blob)
        try:
            control.send(chan, "close")
        except ChannelError:
            pass
        return fh.read_outcome(chan, timeout)[0]
    finally:
        chan.abort()


def connect(srv, keys):
    """The real client; ``keys`` shared by the cases (made once); the dealer's file if the server has one."""
    from cryptogen.client.remote import connect as _connect
    c = _connect(srv.conn_file, timeout=30.0, dealer=getattr(srv, "dealer_file", None))
    c._keys = keys
    return c


def open_session(c, ids=PROMPT, mode: str = "kv-reuse", steps=()):
    """A real session (links dialled, handshakes done); the dealer's randomness when there is one."""
    from cryptogen.sampling import SamplingConfig
    provider = "dealer" if c.dealer_file is not None else "he"
    s = c._session(list(ids), SamplingConfig(), mode, provider, list(steps))
    return s.__enter__()


# mid-session actions: name -> function(session) -> frames to send on the control connection
def _forward(**kw):
    return lambda s: [fh.encode({"type": "forward", **({"start": 0, "T": 3, "logits": "token", "reset": False} | kw)})]


MID_SESSION = {
    "forward start out of range": _forward(start=64, T=1),
    "forward T zero": _forward(T=0),
    "forward T past the context": _forward(T=65),
    "forward start not the cache position": _forward(start=2, T=1),
    "forward start a string": _forward(start="0"),
    "forward T a bool": _forward(T=True),
    "forward logits unknown": _forward(logits="everything"),
    "forward reset not bool": _forward(reset=1),
    "forward reset in kv-reuse": _forward(reset=True),
    "forward huge start": _forward(start=2 ** 70),
    "replayed hello": lambda s: [fh.encode({"type": "hello", "api_key": "x", "version": control.VERSION})],
    "replayed open": lambda s: [fh.encode({"type": "open", "mode": "kv-reuse", "provider": "he"})],
    "resume with its own sid": lambda s: [fh.encode({"type": "resume", "sid": s.sid, "secret": "0" * 64, "cached": 0})],
    "resume with a foreign sid": lambda s: [fh.encode({"type": "resume", "sid": "f" * 32, "secret": "0" * 64,
                                                       "cached": 0})],
    "unknown type": lambda s: [fh.encode({"type": "teleport"})],
    "not json": lambda s: [fh.RAW_CONTROL["not json"]],
    "int64 frame": lambda s: [fh.RAW_CONTROL["int64 frame"]],
    "deep nesting": lambda s: [fh.RAW_CONTROL["deep nesting"]],
}


MID_SESSION_ACTIONS = sorted(MID_SESSION) + ["replayed forward"]


def session_case(srv, keys, action: str, timeout: float = CASE_TIMEOUT) -> str:
    """A real session, then ``action``'s frames on its control connection; the server's answer."""
    c = connect(srv, keys)
    s = None
    try:
        s = open_session(c)
        if action == "replayed forward":  # a real step (one token, no LM head), then the same step again
            from cryptogen.net.control import Forward
            s.step(Forward(0, 1, None), "prefill")
            frames = [fh.encode({"type": "forward", **Forward(0, 1, None).to_msg()})]
        else:
            frames = MID_SESSION[action](s)
        for f in frames:
            c.chan.send(f)
        outcome, _ = fh.read_outcome(c.chan, timeout)
        return outcome
    finally:
        if s is not None:
            s.__exit__(None, None, None)
        c.chan.abort()


# ---- data links --------------------------------------------------------------------------------
is_ct = fh.is_ct_frame


def is_share(arr) -> bool:
    """A share frame of a 2PC protocol (6-byte wire form or int64 elements)."""
    return (arr.dtype == np.uint8 and arr.ndim == 2 and arr.shape[1] == 6) or arr.dtype == np.int64


class Selective:
    """Mutate the ``n``-th frame (0-based) for which ``pick(arr)`` holds, with ``mutation``."""

    def __init__(self, pick, mutation: str, n: int = 0, seed: int = 0):
        self.pick, self.n, self.count = pick, n, 0
        self.inner = fh.NthFrame(0, mutation, np.random.default_rng(seed))
        self.armed = False

    def __call__(self, arr):
        if not self.armed or not self.pick(arr):
            if self.pick(arr):
                self.inner.prev = arr
            return [arr]
        i, self.count = self.count, self.count + 1
        if i != self.n:
            self.inner.prev = arr
            return [arr]
        self.inner.seen = 0
        return self.inner(arr)


def foreign_ct(keys_other):
    """A ciphertext frame under another key set of the same parameters."""
    from cryptogen.twoparty import TAG_RESULT
    n = keys_other.config.n
    return lambda arr, rng: [np.frombuffer(bytes([TAG_RESULT]) + keys_other.ct_to_bytes(
        keys_other.encrypt(np.zeros(n, np.int64))), np.uint8)]


def token_out_of_range(arr, rng):
    """The server's share of the opened token id, shifted so the client opens an id past the vocabulary."""
    return [np.mod(arr.astype(np.int64) + 1000, (1 << 41)).astype(np.int64)]


def link_case(srv, keys, direction: str, pick: str, mutation: str, n: int = 0, seed: int = 0,
              timeout: float = 240.0) -> str:
    """One generation (2 tokens) with one data-link frame of worker 0 mutated: ``direction``
    "to server" (a malicious client) or "to client" (a malicious server). The client's call must end
    with a clear error, in time; returns the outcome ("error:<type>" or "finished")."""
    picks = {"ciphertext": is_ct, "share": is_share, "token share": lambda a: a.dtype == np.int64 and a.shape == (1,)}
    tap = Selective(picks[pick], mutation, n, seed)
    out = {}

    def run():
        from cryptogen.net.control import Forward
        c = connect(srv, keys)
        s = None
        try:
            s = open_session(c, steps=[Forward(0, len(PROMPT), "token")])
            chan = s.parties[0].chan
            (fh.tap_send if direction == "to server" else fh.tap_recv)(chan, tap)
            tap.armed = True
            s.step(Forward(0, len(PROMPT), "token"), "prefill")
            out["tokens"] = s.session.generated
        except BaseException as e:  # noqa: BLE001 - classified below
            out["error"] = e
        finally:
            if s is not None:
                try:
                    s.__exit__(None, None, None)
                except Exception:  # noqa: BLE001
                    pass
            c.chan.abort()
    th = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"the client hangs (over {timeout:.0f} s) after a mutated frame"
    err = out.get("error")
    if err is None:
        assert not tap.inner.detectable(T), \
            f"a mutated {pick} frame ({mutation}) was accepted and the step finished: {out.get('tokens')}"
        return {"outcome": "finished", "seconds": round(time.monotonic() - t0, 1)}
    why = fh.clear(err)
    assert why is None, why
    return {"outcome": f"error:{type(err).__name__}", "seconds": round(time.monotonic() - t0, 1)}


LINK_CASES = [(d, pick, m) for d in ("to server", "to client") for pick in ("ciphertext", "share")
              for m in fh.FRAME_KINDS + ["foreign key"] if not (pick == "share" and m in ("reseal corrupt payload",
                                                                                          "foreign key"))] + \
    [("to client", "token share", "shift by 1000"), ("to client", "token share", "out of field range")]
