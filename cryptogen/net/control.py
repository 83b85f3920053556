"""Typed control messages between the client and the server's gateway (one TLS connection).

Each message is a JSON object in one uint8 frame; binary payloads (the client's public HE
context) follow as their own frame. Both sides check the type, the fields and their ranges
before acting; a bad message ends only its own session with an ``error`` reply.

Flow (client -> server / server -> client):
  1. ``hello`` {api_key, version}             -> ``welcome`` {model, he, workers, layer_groups, tokenizer,
                                                  name, dealer, logits (False: ``serve --token-only``)}
                                                  or ``error`` {code: "auth"} (no work is started)
  2. ``open`` {mode, provider} + public ctx   -> ``session`` {sid, resume, links: [{worker, host, port, tokens}]}
                                                  or ``error`` {code: "busy", retry_after}
     the client then dials every worker link (TLS, pinned certificate) and sends its link token first;
     ``resume`` is the session's 256-bit resume secret (step 6)
  3. ``forward`` {start, T, logits, reset}    -> ``done`` {seconds, cached, kv_bytes}   (per prefill / decode step)
     ``logits``: null (no LM head), "last" / "all" (logit shares opened to the client), "token"
     (a 2PC argmax opens only the next token to the client, mpc/argmax.py)
                                              or ``retry`` {cached, links, reason}: a server worker was
     restarted; the client rolls back to ``cached``, dials the new links and sends the same step again
  4. ``end`` {}                               -> the server frees the session (also on disconnect, after
                                                  the resume grace period)
  5. ``close`` {}                             -> the connection ends
  6. after ``hello``, on a new connection: ``resume`` {sid, secret, cached} -> ``retry`` {cached, links, reason}:
     a client whose connection dropped continues its session from the position it last saw confirmed
Who learns what: the server learns the public counts (prompt length, steps, positions) and the
public context; the client learns the model's public shape and the public timings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from cryptogen.mpc.errors import ChannelError

VERSION = 4  # 2: token-only output ("token" steps, the welcome's "logits"); 3: retry / resume;
# 4: the layers' weights at 2^(f+4) and attention probabilities at 2^(f+6) (other truncation amounts)
MAX_CONTROL = 16 << 20  # JSON messages (the welcome carries the tokenizer)
MODES = ("kv-reuse", "recompute")
PROVIDERS = ("he", "dealer")
LOGITS = (None, "last", "token", "all")


class ProtocolError(ValueError):
    """A control message is malformed or not allowed now (its session ends, others continue)."""


class RemoteError(RuntimeError):
    """The other side reported an error (``code``: auth, busy, bad_request, session, internal)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


def one_line(value, default: str) -> str:
    """A peer's text as one printable line (control characters and newlines become spaces)."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value)) if isinstance(value, str) else ""
    return " ".join(text.split()) or default


def send(chan, kind: str, **fields) -> None:
    data = json.dumps({"type": kind, **fields}, separators=(",", ":")).encode()
    chan.send(np.frombuffer(data, np.uint8))


def send_error(chan, code: str, message: str, **extra) -> None:
    try:
        send(chan, "error", code=code, message=message, **extra)
    except ChannelError:
        pass


def recv(chan, *expected: str) -> dict:
    """The next control message; ``RemoteError`` if it is an error, ``ProtocolError`` if its type
    is not one of ``expected`` or it is not a JSON object."""
    arr = chan.recv()
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size > MAX_CONTROL:
        raise ProtocolError("expected a control message (a JSON object)")
    try:
        msg = json.loads(arr.tobytes())
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nesting thousands deep
        raise ProtocolError("a control message is not valid JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a control message has no type")
    if msg["type"] == "error":
        retry = msg.get("retry_after")
        retry = float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool) \
            and 0 <= retry <= 86400 else None
        raise RemoteError(one_line(msg.get("code"), "internal")[:40], one_line(msg.get("message"), "unknown error")[:500],
                          retry)
    if expected and msg["type"] not in expected:
        raise ProtocolError(f"unexpected control message {msg['type'][:40]!r} (expected {' or '.join(expected)})")
    return msg


def recv_blob(chan, max_bytes: int, what: str) -> bytes:
    arr = chan.recv()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ProtocolError(f"expected the {what} as bytes")
    if arr.size > max_bytes:
        raise ProtocolError(f"the {what} is {arr.size} bytes, over the cap of {max_bytes}")
    return arr.tobytes()


def send_blob(chan, data: bytes) -> None:
    chan.send(np.frombuffer(data, np.uint8))


def need_int(msg: dict, key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}]")
    return v


def need_choice(msg: dict, key: str, choices) -> object:
    v = msg.get(key)
    if v not in choices:
        raise ProtocolError(f"field {key!r} must be one of {', '.join(map(str, choices))}")
    return v


@dataclass(frozen=True)
class Forward:
    """One pass of tokens start .. start+T-1 (``reset``: drop the cache first, recompute mode)."""

    start: int
    T: int
    logits: str | None
    reset: bool = False

    def to_msg(self) -> dict:
        return dict(start=self.start, T=self.T, logits=self.logits, reset=self.reset)

    @classmethod
    def from_msg(cls, msg: dict, n_positions: int) -> "Forward":
        start = need_int(msg, "start", 0, n_positions - 1)
        T = need_int(msg, "T", 1, n_positions - start)
        logits = need_choice(msg, "logits", LOGITS)
        reset = msg.get("reset", False)
        if not isinstance(reset, bool):
            raise ProtocolError("field 'reset' must be true or false")
        return cls(start, T, logits, reset)


def link_cap(cfg, he_config, widest_cols: int | None = None) -> int:
    """Largest frame a data link may carry: a ciphertext, or a (positions x widest) share matrix
    (the score pass's logit shares), or the HE provider's public context, whichever is largest."""
    ct = 2 * (len(he_config.qi_sizes) + 1) * he_config.n * 8 + 65536
    widest = max(3 * cfg.n_embd, cfg.d_ff, widest_cols or cfg.vocab_size, cfg.n_positions)
    shares = 8 * cfg.n_positions * widest + 4096
    keys = 4 * ct + 65536  # the HE provider's context: public key + relinearisation key, no Galois keys
    return max(ct, shares, keys, 16 << 20)


def public_context_cap(he_config, n_steps: int) -> int:
    """The client's public context: public key, relinearisation key, one Galois key per step."""
    ct = 2 * (len(he_config.qi_sizes) + 1) * he_config.n * 8
    per_key = ct * len(he_config.qi_sizes)  # a key switching key: (levels) x ciphertext
    return (3 + n_steps) * per_key + (1 << 20)
