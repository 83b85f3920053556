"""Shared pieces of the protocol fuzz tests (tests/fuzz) and ``scripts/fuzz.py``.

Importable as ``fuzz_helpers`` (tests/fuzz is on the path while its tests run; the script adds
it). Nothing here uses ``from conftest import``.

Tables (adding a message type or a mutation is one line):
  CLIENT_MESSAGES   client -> server control messages: type -> a valid example's fields
  SERVER_MESSAGES   server -> client control messages: type -> a valid example's fields
  FIELD_VALUES      wrong JSON values a field is replaced by (other types, out of range, huge)
  FRAME_MUTATIONS   what a data-link frame (numpy array) is replaced by: name -> function
  BYTE_MUTATIONS    what a byte string (ciphertext, envelope, public context) is replaced by

The invariant every case checks (``clear``): the receiving side ends with an exception of the
project's own types whose message is one line, or an ``error`` control reply; never another
exception type, a crash or a hang.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from cryptogen.net import control

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"

# ---- the invariant ------------------------------------------------------------------------------
MAX_MESSAGE = 1000  # characters of an error message (one line)


def project_error(exc: BaseException) -> bool:
    """An exception of the project's own types (cryptogen.*: HEError, MPCError, ProtocolError,
    RemoteError, ConnectError, ...)."""
    return type(exc).__module__.startswith("cryptogen")


def one_line(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text and "\r" not in text and len(text) <= MAX_MESSAGE


def clear(exc: BaseException) -> str | None:
    """None if ``exc`` is a clear error (project type, one-line message), else why not."""
    if not project_error(exc):
        return f"not a project error: {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:200]!r}"
    if not one_line(str(exc)):
        return f"{type(exc).__name__} message is not one line: {str(exc)[:300]!r}"
    return None


# ---- control messages ---------------------------------------------------------------------------
def _hello(env):
    return {"api_key": env["api_key"], "version": control.VERSION}


# client -> server. ``env``: api_key, sid/secret of a session (for resume), positions.
CLIENT_MESSAGES = {
    "hello": _hello,
    "open": lambda env: {"mode": "kv-reuse", "provider": "he"},
    "forward": lambda env: {"start": env.get("cached", 0), "T": 2, "logits": "token", "reset": False},
    "end": lambda env: {},
    "close": lambda env: {},
    "resume": lambda env: {"sid": env.get("sid", "0" * 32), "secret": env.get("secret", "0" * 64),
                           "cached": env.get("cached", 0)},
}


def _welcome(env):
    from cryptogen.he.params import HEConfig
    return {"version": control.VERSION, "model": env["model"], "he": HEConfig().to_dict(), "workers": 1,
            "layer_groups": 1, "tokenizer": None, "name": "tiny", "dealer": False, "logits": True}


# server -> client
SERVER_MESSAGES = {
    "welcome": _welcome,
    "session": lambda env: {"sid": "ab" * 16, "resume": "cd" * 32, "links": env["links"], "mode": "kv-reuse",
                            "provider": "he"},
    "done": lambda env: {"seconds": 0.5, "cached": 2, "kv_bytes": 1024},
    "retry": lambda env: {"cached": 0, "links": env["links"], "reason": "server worker 0 was restarted"},
    "error": lambda env: {"code": "session", "message": "the session failed on the server: x"},
}

# values a field is replaced by: other JSON types, out of range, huge, control characters
FIELD_VALUES = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 40, 1.5, float("1e308"),
                "", "x", "0" * 64, "a\nb", "\x1b[31mred\x1b[0m", "é", "x" * 70000, [], [1, 2], {}, {"a": 1},
                [{"worker": 0}], "kv-reuse", "he", "dealer", "token", "last", "all"]


def encode(msg) -> np.ndarray:
    """A control frame for any JSON value (a dict with ``type`` for a real message)."""
    return np.frombuffer(json.dumps(msg, separators=(",", ":"), allow_nan=True).encode(), np.uint8)


RAW_CONTROL = {  # frames that are no control message at all
    "not json": np.frombuffer(b"not json", np.uint8),
    "empty": np.zeros(0, np.uint8),
    "json list": encode([1, 2, 3]),
    "json number": encode(7),
    "no type": encode({"api_key": "x"}),
    "type not str": encode({"type": 5}),
    "int64 frame": np.arange(4, dtype=np.int64),
    "float frame": np.zeros(3, np.float64),
    "2-d frame": np.zeros((2, 2), np.uint8),
    "bool frame": np.ones(3, np.bool_),
    "invalid utf-8": np.frombuffer(b'{"type": "\xff\xfe"}', np.uint8),
    "huge int": np.frombuffer(b'{"type": "hello", "version": ' + b"9" * 5000 + b"}", np.uint8),
    "deep nesting": np.frombuffer(b"[" * 100000 + b"]" * 100000, np.uint8),
}


def message_strategy(table: dict, env: dict, types=None):
    """Hypothesis: a mutated control frame (numpy uint8 array) built from ``table``'s valid examples:
    a valid message, a field dropped / replaced / added, the type swapped, or a raw non-message."""
    from hypothesis import strategies as st

    names = sorted(types or table)

    @st.composite
    def build(draw):
        how = draw(st.sampled_from(["valid", "drop", "replace", "add", "retype", "raw"]))
        if how == "raw":
            name = draw(st.sampled_from(sorted(RAW_CONTROL)))
            return f"raw:{name}", RAW_CONTROL[name]
        kind = draw(st.sampled_from(names))
        fields = dict(table[kind](env))
        label = f"{kind}:{how}"
        if how == "drop" and fields:
            key = draw(st.sampled_from(sorted(fields)))
            del fields[key]
            label += f":{key}"
        elif how == "replace" and fields:
            key = draw(st.sampled_from(sorted(fields)))
            fields[key] = draw(st.sampled_from(FIELD_VALUES))
            label += f":{key}"
        elif how == "add":
            fields[draw(st.sampled_from(["sid", "extra", "type2", "links", "x" * 200]))] = \
                draw(st.sampled_from(FIELD_VALUES))
        elif how == "retype":
            kind = draw(st.sampled_from(sorted(set(CLIENT_MESSAGES) | set(SERVER_MESSAGES)) + ["", "HELLO", "x" * 50]))
            label += f":{kind[:20]}"
        return label, encode({"type": kind, **fields})
    return build()


def read_outcome(chan, timeout: float) -> tuple[str, list]:
    """Read control replies until an ``error`` or the end of the connection, at most ``timeout`` s.
    Returns (outcome, replies): "error:<code>" / "closed"; raises AssertionError on a hang, an
    unclear error, a reply that is no control message, or a multi-line error message."""
    old, chan.timeout = chan.timeout, timeout
    deadline = time.monotonic() + timeout
    replies = []
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no error and no close within {timeout:.0f} s (a hang); replies {replies}")
            try:
                msg = control.recv(chan)
            except control.RemoteError as e:
                assert one_line(str(e)) and isinstance(e.code, str), f"unclear error reply {str(e)[:300]!r}"
                return f"error:{e.code}", replies
            except control.ProtocolError as e:
                raise AssertionError(f"the server sent something that is no control message: {e}") from None
            except Exception as e:  # noqa: BLE001 - classified below
                from cryptogen.net.channel import IdleTimeout
                if isinstance(e, IdleTimeout):
                    raise AssertionError(f"no error and no close within {timeout:.0f} s (a hang); "
                                         f"replies {replies}") from None
                why = clear(e)
                assert why is None, why
                return "closed", replies
            replies.append(msg["type"])
    finally:
        chan.timeout = old


# ---- frames on the data links -------------------------------------------------------------------
def _flip(arr, rng):
    out = arr.copy()
    flat = out.reshape(-1).view(np.uint8)
    if flat.size:
        i = rng.integers(0, flat.size, size=max(1, flat.size // 4096))
        flat[i] ^= np.uint8(1 << int(rng.integers(0, 8)))
    return [out]


def _reseal(arr, rng):
    """A tagged ciphertext whose SEAL payload is corrupted under a *valid* envelope checksum."""
    from cryptogen.he import serialize
    raw = arr.tobytes()
    if arr.dtype != np.uint8 or len(raw) < 200 or raw[1:5] != serialize.MAGIC:
        return _flip(arr, rng)
    meta, payload, fp, kid = serialize.unpack(raw[1:], "ciphertext")
    p = bytearray(payload)
    for i in rng.integers(0, len(p), size=8):
        p[int(i)] ^= 0xFF
    p[48] ^= 1  # and the NTT flag: SEAL itself would load it
    return [np.frombuffer(raw[:1] + serialize.pack("ciphertext", fp, kid, meta, bytes(p)), np.uint8)]


FRAME_MUTATIONS = {
    "flip bytes": _flip,
    "reseal corrupt payload": _reseal,
    "truncate half": lambda a, rng: [a.reshape(-1)[: a.size // 2].copy()],
    "truncate one": lambda a, rng: [a.reshape(-1)[:-1].copy()],
    "extend": lambda a, rng: [np.concatenate([a.reshape(-1), a.reshape(-1)[:7]])],
    "empty": lambda a, rng: [a.reshape(-1)[:0].copy()],
    "wrong dtype float": lambda a, rng: [a.astype(np.float64)],
    "wrong dtype int64": lambda a, rng: [a.astype(np.int64) if a.dtype != np.int64 else a.view(np.uint8).copy()],
    "wrong shape 2-d": lambda a, rng: [a.reshape(1, -1).copy() if a.ndim == 1 else a.reshape(-1).copy()],
    "out of field range": lambda a, rng: [np.full(a.shape, (1 << 62), np.int64) if a.dtype == np.int64
                                          else np.full(a.shape, 255, a.dtype)],
    "negative": lambda a, rng: [-np.abs(a.astype(np.int64)) - 1],
    "random same shape": lambda a, rng: [rng.integers(0, 256, a.shape).astype(a.dtype)],
    "shift by 1000": lambda a, rng: [np.mod(a.astype(np.int64) + 1000, 1 << 41)],
    "duplicate": lambda a, rng: [a, a],
}


# ---- byte strings (envelopes) -----------------------------------------------------------------
def byte_mutation():
    """Hypothesis: (label, function bytes -> bytes) over a byte string of any length."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "splice", "random", "empty", "header"]))
        where = draw(st.floats(0, 1, exclude_max=True))
        val = draw(st.integers(0, 255))
        count = draw(st.integers(1, 64))

        def at(data):
            return int(where * len(data)) if data else 0

        def apply(data: bytes) -> bytes:
            b = bytearray(data)
            if kind == "empty":
                return b""
            if kind == "random":
                return os.urandom(count)
            if kind == "truncate":
                return bytes(b[: at(b)])
            if kind == "extend":
                return bytes(b) + bytes([val]) * count
            if not b:
                return bytes([val])
            i = at(b)
            if kind == "header":  # the envelope and SEAL headers: the first ~160 bytes
                i = int(where * min(len(b), 160))
            if kind == "flip":
                b[i] ^= 1 << (val % 8)
            elif kind in ("set", "header"):
                b[i] = val if b[i] != val else (val ^ 0xFF)
            elif kind == "splice":
                b[i:i + count] = os.urandom(count)
            return bytes(b)
        return f"{kind}@{where:.3f}", apply
    return build()


# ---- channel taps -------------------------------------------------------------------------------
def tap_send(chan, fn):
    """Route every frame ``chan`` sends through ``fn(arr) -> list of arrays`` (an instance patch)."""
    raw = chan._send_raw

    def send(arr):
        for out in fn(arr):
            raw(out)
    chan._send_raw = send
    return chan


def tap_recv(chan, fn):
    """Route every frame ``chan`` receives through ``fn(arr) -> list of arrays`` (an instance patch)."""
    raw, pending = chan._recv_raw, []

    def recv():
        while not pending:
            pending.extend(fn(raw()))
        return pending.pop(0)
    chan._recv_raw = recv
    return chan


class NthFrame:
    """Mutates the ``n``-th frame that passes (0-based) with ``mutation``; counts frames."""

    def __init__(self, n: int, mutation: str, rng=None):
        self.n, self.mutation, self.rng = n, mutation, rng or np.random.default_rng(0)
        self.seen, self.prev, self.hit, self.original, self.sent = 0, None, False, None, None

    def __call__(self, arr):
        i, self.seen = self.seen, self.seen + 1
        prev, self.prev = self.prev, arr
        if i != self.n:
            return [arr]
        self.hit, self.original = True, arr
        if self.mutation == "replay previous":
            self.sent = [prev if prev is not None else arr]
        elif self.mutation == "drop":
            self.sent = []
        else:
            fn = self.mutation if callable(self.mutation) else FRAME_MUTATIONS[self.mutation]
            self.sent = fn(arr, self.rng)
        return self.sent

    def changed(self) -> bool:
        """The frame was replaced by one frame that differs from it (dtype, shape or any byte)."""
        if not self.hit or len(self.sent) != 1:
            return False
        m, o = self.sent[0], self.original
        return m.dtype != o.dtype or m.shape != o.shape or not np.array_equal(m, o)

    def detectable(self, t: int) -> bool:
        """Whether an honest receiver can tell: any changed byte of a ciphertext frame (it carries a
        checksum; a re-sealed one a corrupted SEAL layout); another dtype or shape of a share frame,
        or share values outside Z_t. A share changed within Z_t, a dropped or duplicated frame can
        only be caught later or not at all (semi-honest protocols carry no MACs), and so can a frame
        replaced by an earlier valid one ("replay previous": same key, valid checksum, no sequence number)."""
        if not self.hit or len(self.sent) != 1 or self.mutation == "replay previous":
            return False
        if is_ct_frame(self.original):
            return self.changed()
        return detectable_share(self.original, self.sent[0], t)


def is_ct_frame(arr) -> bool:
    """A tagged ciphertext frame (cryptogen/twoparty.py): 1-d uint8, a tag byte, a CGHE envelope."""
    return arr.dtype == np.uint8 and arr.ndim == 1 and arr.size > 100 and arr[1:5].tobytes() == b"CGHE"


def detectable_share(orig: np.ndarray, m: np.ndarray, t: int) -> bool:
    if m.dtype != orig.dtype or m.shape != orig.shape:
        return True
    if m.dtype == np.int64:
        return bool(m.size and (m.min() < 0 or m.max() >= t))
    if m.dtype == np.uint8 and m.ndim == 2 and m.shape[1] == 6:
        full = np.zeros((m.shape[0], 8), np.uint8)
        full[:, :6] = m
        return bool((full.view("<i8") >= t).any())
    return False


FRAME_KINDS = sorted(FRAME_MUTATIONS) + ["replay previous"]  # "drop" waits out a timeout: the script only


# ---- the real server (the ServerProcess harness of tests/server) ----------------------------------
def server_harness():
    """tests/server/conftest.py as a module of its own name (its ``ServerProcess`` and helpers)."""
    import sys
    if "fuzz_server_harness" in sys.modules:
        return sys.modules["fuzz_server_harness"]
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    spec = importlib.util.spec_from_file_location("fuzz_server_harness", TESTS / "server" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_server_harness"] = mod
    spec.loader.exec_module(mod)
    return mod


CRASH_MARKS = ("Exception in thread", "Traceback (most recent call last)", "Segmentation fault", "SIGSEGV",
               "Fatal Python error", "core dumped", "worker died", "Worker died")


def server_log_news(srv) -> str:
    """What the server logged since the last call (``srv._log_seen``: the offset already read)."""
    log = srv.log.read_text(errors="replace")
    new, srv._log_seen = log[getattr(srv, "_log_seen", 0):], len(log)
    return new


# crashes the fuzz found in files it does not own: name -> (what identifies it in the server's log, the fix)
KNOWN_SERVER_ISSUES: dict = {}  # found and not fixed: none (tolerated by server_alive when given a Counter)
FOUND_SERVER_ISSUES = {  # found by the fuzz and fixed; each keeps a reproducer
    "deep JSON nesting": ("RecursionError",
                          "cryptogen/net/control.py recv: catch RecursionError from json.loads like ValueError "
                          "(ProtocolError 'a control message is not valid JSON'); today a JSON frame nested ~1000 "
                          "deep kills the gateway's session thread (server/gateway.py _serve catches neither) and "
                          "the client gets no error reply"),
}


def server_alive(srv, known=None, settle: float = 0.05) -> None:
    """The ``cryptogen serve`` process runs, answers its metrics endpoint, and logged no crash
    (an uncaught exception in a session thread, a worker's death) since the last check. A crash
    of ``KNOWN_SERVER_ISSUES`` is counted in ``known`` (a Counter) if given, else fails too."""
    time.sleep(settle)  # a session thread that just closed its connection may still be printing
    new = server_log_news(srv)
    assert srv.proc.poll() is None, "the server process died: " + new[-2000:]
    srv.metrics()
    for bad in CRASH_MARKS:
        if bad in new:
            for name, (mark, _fix) in KNOWN_SERVER_ISSUES.items():
                if known is not None and mark in new:
                    known[name] += 1
                    return
            lines = [ln for ln in new.splitlines() if ln.strip()]
            raise AssertionError(f"the server logged {bad!r}: " + " | ".join(lines[-4:])[-600:])


class HonestLoop:
    """Honest generations on their own connections, one after another in a thread, while the
    fuzz runs; ``stop`` waits for the one in flight and checks every result against greedy."""

    def __init__(self, conn_file, prompt, n_tokens: int, expected: list[int], provider: str = "dealer",
                 dealer_file=None, keys=None):
        self.conn_file, self.prompt, self.n, self.expected = conn_file, prompt, n_tokens, expected
        self.provider, self.dealer_file, self.keys = provider, dealer_file, keys
        self.results, self.errors = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="honest-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from cryptogen.client.remote import connect
        while not self._stop.is_set():
            try:
                t0 = time.monotonic()
                with connect(self.conn_file, dealer=self.dealer_file) as c:
                    if self.keys is not None:
                        c._keys = self.keys
                    self.results.append(list(c.generate(self.prompt, self.n, provider=self.provider)))
            except Exception as e:  # noqa: BLE001 - reported by stop()
                self.errors.append(f"{type(e).__name__}: {e} (after {time.monotonic() - t0:.0f} s, at "
                                   f"{time.strftime('%H:%M:%S')})")
                return

    def stop(self, timeout: float = 600) -> int:
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the honest session hangs"
        assert not self.errors, f"the honest session failed: {self.errors}"
        assert self.results, "no honest session finished"
        assert all(r == self.expected for r in self.results), (self.results, self.expected)
        return len(self.results)


# ---- a fake server (for fuzzing what the client receives) ---------------------------------------
class FakeServer:
    """A TLS listener with the project's certificate helpers; each connection runs
    ``script(chan)`` in a thread (``chan``: a server-side TLSChannel)."""

    def __init__(self, state_dir: Path, max_frame: int = 256 << 20):
        import asyncio

        from cryptogen.net.channel import TLSChannel, run
        from cryptogen.net.tls import ensure_certificate, fingerprint, server_context

        self.cert, key = ensure_certificate(state_dir)
        self.fingerprint = fingerprint(self.cert)
        self.script = None
        self.errors: queue.Queue = queue.Queue()
        ctx = server_context(self.cert, key)

        async def on_connect(reader, writer):
            chan = TLSChannel(reader, writer, max_frame=max_frame, timeout=30.0)
            threading.Thread(target=self._serve, args=(chan,), daemon=True).start()

        self.server = run(asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ctx))
        self.host, self.port = self.server.sockets[0].getsockname()[:2]

    def _serve(self, chan) -> None:
        try:
            if self.script is not None:
                self.script(chan)
        except Exception as e:  # noqa: BLE001 - the client may hang up at any point
            self.errors.put(e)
        finally:
            try:
                chan.close()
            except Exception:  # noqa: BLE001
                pass

    def info(self, api_key: str = "k" * 64):
        from cryptogen.client.remote import ServerInfo
        return ServerInfo.make(f"{self.host}:{self.port}", self.cert, api_key)

    def close(self) -> None:
        from cryptogen.net.channel import io_loop
        io_loop().call_soon_threadsafe(self.server.close)


def tiny_model_hf() -> dict:
    import sys
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from tiny import TINY
    return TINY.to_hf()
