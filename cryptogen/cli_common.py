"""What the CLI's command modules share (``cli.py`` and ``secure_cli.py`` both import this; neither
imports the other's internals), and the argument checks every front end runs before any work
(``cli.py``, ``server/serve.py``, ``bench.py``, ``client/proxy.py``, the Python APIs).

Each check raises ``err`` (a ``ValueError``; ``UsageError`` unless told otherwise) with one line:
``<what was wrong>; <what to do>``. ``name`` is how the user spelled the argument: ``--flag`` on the
command line, the keyword in the Python API.
"""
from __future__ import annotations

import errno
import math
import numbers
import os
import reprlib
import socket
import sys
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input that the user can fix."""


def _show(v) -> str:
    return reprlib.repr(v)  # a huge number or a long string stays short


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _span(kind: str, lo, hi, lo_open: bool = False) -> str:
    """``an integer in 0..65535``, ``a number in (0, 1]``, ``an integer >= 1``, ``a number > 0``."""
    if kind == "an integer":
        if lo is not None and hi is not None:
            return f"an integer in {lo}..{hi}"
        return f"an integer >= {lo}" if lo is not None else (f"an integer <= {hi}" if hi is not None else kind)
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"a number {'>' if lo_open else '>='} {lo:g}"
    return f"a number <= {hi:g}" if hi is not None else "a finite number"


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, note: str = "",
              err=UsageError) -> int:
    """An integer (not a bool, not a float) in [lo, hi]."""
    want = _span("an integer", lo, hi) + (f" ({note})" if note else "")
    if not _is_int(value):
        raise err(f"{name} {_show(value)} is not an integer; use {want}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise err(f"{name} {_show(value)} is out of range; use {want}")
    return int(value)


def check_float(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                note: str = "", err=UsageError) -> float:
    """A finite real number (not a bool, not NaN or infinity) in [lo, hi] (or (lo, hi])."""
    want = _span("a number", lo, hi, lo_open) + (f" ({note})" if note else "")
    if not _is_real(value):
        raise err(f"{name} {_show(value)} is not a number; use {want}")
    try:
        v = float(value)
    except OverflowError:  # an integer too large for a float
        v = math.inf if value > 0 else -math.inf
    if not math.isfinite(v):
        raise err(f"{name} {v} is not a finite number; use {want}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise err(f"{name} {v:g} is out of range; use {want}")
    return v


def check_port(name: str, value, err=UsageError) -> int:
    """A TCP port to listen on, 0..65535 (0: any free port)."""
    return check_int(name, value, 0, 65535, "a TCP port, 0: any free port", err)


def check_choice(name: str, value, choices, err=UsageError) -> str:
    if not isinstance(value, str) or value not in choices:
        raise err(f"unknown {name} {_show(value)}; choose {_alternatives(choices)}")
    return value


def _alternatives(choices) -> str:
    choices = list(choices)
    return " or ".join(choices) if len(choices) <= 2 else f"one of {', '.join(choices)}"


def split_host_port(name: str, value, example: str, zero_port: bool = True, err=UsageError) -> tuple[str, int]:
    """("host", port) of ``HOST:PORT`` or ``[v6]:PORT``; port 1..65535 (0 too with ``zero_port``)."""
    text = value if isinstance(value, str) else ""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ok = (host and port.isascii() and port.isdigit() and (0 if zero_port else 1) <= int(port) <= 65535
          and not any(c.isspace() or c in "[]/" for c in host))
    if not ok:
        raise err(f"{name} {_show(value)} is not HOST:PORT; use e.g. {example}")
    return host, int(port)


def check_ray_address(name: str, value, err=UsageError) -> str:
    """A Ray cluster address: HOST:PORT of `ray start --head`, ``auto``, ``local`` or ``ray://HOST:PORT``."""
    if value in ("auto", "local"):
        return value
    text = value[len("ray://"):] if isinstance(value, str) and value.startswith("ray://") else value
    try:
        split_host_port(name, text, "", zero_port=False, err=err)
    except ValueError:
        raise err(f"{name} {_show(value)} is not a Ray cluster address; use HOST:PORT of `ray start --head` "
                  "(e.g. 127.0.0.1:6379), or leave it out for an embedded local Ray") from None
    return value


def check_file(name: str, path, what: str, err=UsageError) -> Path:
    """An existing, readable file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise err(f"{name} {path}: no such file; pass {what}")
    if not p.is_file():
        raise err(f"{name} {path} is not a file; pass {what}")
    if not os.access(p, os.R_OK):
        raise err(f"{name} {path} is not readable; pass {what} this user can read")
    return p


def check_writable_dir(name: str, path, err=UsageError, shown=None) -> Path:
    """A folder that is writable, or can be made (its nearest existing ancestor is a writable
    folder). Nothing is left behind here. ``shown``: the path named in the error (default ``path``)."""
    p = Path(path).expanduser()
    path = path if shown is None else shown
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise err(f"{name} {path}: {probe} is not a folder; pass a folder this user can write")
    try:  # os.access is not enough (root, read-only mounts, /proc): a file made and gone at once
        with tempfile.TemporaryFile(dir=probe, prefix=".cryptogen-check-"):
            pass
    except OSError as e:
        raise err(f"{name} {path}: cannot write in {probe} ({e.strerror or e}); pass a folder this user can "
                  "write") from None
    return p


def check_output_file(name: str, path, err=UsageError) -> Path:
    """A file that can be written: not a folder, and its folder writable or makeable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise err(f"{name} {path} is a folder; pass a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise err(f"{name} {path} is not writable; pass a file this user can write")
    check_writable_dir(name, p.parent, err, shown=path)
    return p


def check_can_listen(name: str, host: str, port: int, err=UsageError) -> None:
    """A listening socket can be bound at host:port now (port 0 always can, if host is this
    machine's): a taken port or a foreign address is reported before anything starts."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise err(f"{name} {host}:{port}: unknown host ({getattr(e, 'strerror', None) or e}); "
                  "use an address of this machine") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise err(f"{name} {host}:{port}: the port is in use; pick another port (0: any free port)") from None
            raise err(f"{name} {host}:{port}: cannot listen there ({e.strerror or e}); "
                      "use an address of this machine") from None


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise UsageError(f"the prompt must be text, got {type(prompt).__name__}; pass a string with --prompt")
    if not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt")
    return prompt


REVEALS = ("token", "logits")  # cryptogen.driver.REVEALS (not imported here: it pulls in the secure plan)
CONNECT_FILE = "the connection file `cryptogen serve` wrote"
DEALER_FILE = "the dealer's client connection file (dealer-client.json)"


def check_connection_args(*, workers=1, address=None, provider="he", dealer=None, connect_file=None, server=None,
                          server_cert=None, metrics_port=None, mode="kv-reuse") -> None:
    """The secure commands' connection flags (generate and eval alike), before anything starts."""
    from .net.control import MODES, PROVIDERS

    check_int("--workers", workers, 1)
    check_choice("--mode", mode, MODES)
    check_choice("--provider", provider, PROVIDERS)
    if address is not None:
        check_ray_address("--address", address)
    if metrics_port is not None:
        check_port("--metrics-port", metrics_port)
    if connect_file is not None:
        check_file("--connect", connect_file, CONNECT_FILE)
    if server is not None:
        split_host_port("--server", server, "203.0.113.5:7860", zero_port=False)
    if server_cert is not None:
        check_file("--server-cert", server_cert, "the server's certificate (PEM)")
    if dealer is not None:
        check_file("--dealer", dealer, DEALER_FILE)
    if provider == "dealer" and not dealer:
        raise UsageError(f"--provider dealer needs --dealer FILE; pass {DEALER_FILE}")


def check_generate_args(prompt, max_new_tokens, sampling, *, reveal="token", secure=False, **connection):
    """Every argument of ``cryptogen generate`` (and of ``secure_cli.generate_secure``), before a
    model is loaded, a server started or a key made. ``sampling``: a SamplingConfig or
    (temperature, top_k, seed). Returns the SamplingConfig."""
    from .sampling import SamplingConfig

    check_prompt(prompt)
    check_int("--max-new-tokens", max_new_tokens, 1)
    if not isinstance(sampling, SamplingConfig):
        temperature, top_k, seed = sampling
        check_float("--temperature", temperature, 0.0, note="0: greedy")
        check_int("--top-k", top_k, 0, note="0: all tokens")
        if seed is not None:
            check_int("--seed", seed, 0)
        sampling = SamplingConfig(temperature, top_k, seed)
    check_choice("--reveal", reveal, REVEALS)
    check_connection_args(**connection)
    if secure and reveal == "token" and (sampling.top_k or sampling.top_p < 1):
        raise UsageError("--top-k needs the logits: add --reveal logits (token-only output supports greedy "
                         "and --temperature sampling)")
    return sampling


def check_eval_args(*, windows=4, window=128, max_tokens=None, lambada_limit=None, **connection) -> None:
    """Every argument of ``cryptogen eval`` (and of ``secure_cli.secure_eval``) but the data and the model."""
    check_int("--windows", windows, 1)
    check_int("--window", window, 2)
    if max_tokens is not None:
        check_int("--max-tokens", max_tokens, 2)
    if lambada_limit is not None:
        check_int("--lambada-limit", lambada_limit, 1)
    check_connection_args(**connection)


def encode_prompt(tok, prompt: str, n_positions: int, max_new_tokens: int) -> list[int]:
    check_prompt(prompt)
    ids = tok.encode(prompt).ids
    if len(ids) + max_new_tokens > n_positions:
        raise UsageError(
            f"the prompt is {len(ids)} tokens and --max-new-tokens is {max_new_tokens}: together more than "
            f"the model's context of {n_positions}; shorten the prompt or ask for fewer tokens")
    return ids


class TokenStream:
    """Prints generated text as it comes (decoding the whole tail so multi-byte characters stay whole)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def close(self) -> None:
        """Flush whatever is left, even an incomplete multi-byte character."""
        text = self.tok.decode(self.ids)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        self.shown = text
