"""The dealer as a stand-alone program (``cryptogen dealer --listen HOST:PORT``): a third party,
on its own machine, serves correlated randomness (Beaver triples, matrix triples, solved bits
over Z_t) to the client and the server over TLS.

Who holds what:

* the dealer holds its TLS certificate and key and the two role keys (``state_dir``), and,
  briefly, both halves of every batch it makes: it keeps the other role's half of a batch in
  memory until that role fetches it (bounded per link), then forgets it;
* it writes one connection file per role (``out_dir``, mode 0600): the client's file goes to
  the user, the server's to the model owner; each holds only that role's key;
* it never receives an input or a share: a party sends only a hello (key, link id, t) and
  public request sizes (seq, kind, count, matrix shape), see ``cryptogen.mpc.provider_remote``.

Who learns what: each party learns only its own halves (the role is bound to the key, checked
in constant time before any work); the dealer learns link ids (hashes of a secret the two
parties share), public sizes and timing. Security needs the dealer not to collude with either
party. Errors and logs carry roles, sizes and peer addresses only, never a key or a value.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cryptogen.mpc.errors import ChannelError, ProviderError
from cryptogen.mpc.provider import _FIELDS, Dealer
from cryptogen.mpc.provider_remote import (DEFAULT_STEP_AHEAD, HELLO_BYTES, MAGIC, MAX_REQUEST_BYTES, OK, ROLES,
                                           decode_request, error_frames, split_address)
from cryptogen.net.channel import frame, read_frame, tune_writes, write_chunked
from cryptogen.net.tls import TLSError, ensure_certificate, fingerprint, new_secret, same_secret, server_context

log = logging.getLogger("cryptogen.dealer")

DEFAULT_MAX_LINKS = 64
DEFAULT_IDLE_TIMEOUT = 900.0
DEFAULT_MAX_PENDING = 256 << 20  # bytes of not-yet-fetched halves per link
HELLO_TIMEOUT = 10.0
_IN_FRAME = 256  # the largest frame a party ever sends (hello 76 bytes, request 48)
_WILDCARD = ("0.0.0.0", "::", "")


class _Refuse(Exception):
    """End this connection with one error frame (the message names public facts only)."""


class _Slot:
    __slots__ = ("spec", "size", "fut")

    def __init__(self, spec, size, fut):
        self.spec, self.size, self.fut = spec, size, fut
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"


class _Link:
    """One pairing of a client end and a server end (state lives on the dealer's loop)."""

    def __init__(self, t: int):
        self.t, self.dealer = t, Dealer(t)
        self.next_seq = dict.fromkeys(ROLES, 0)
        self.slots: dict = {}      # seq -> _Slot made by the first role to ask
        self.pending = 0           # bytes of halves made and not yet fetched
        self.ends: dict = {}       # role -> "open" | "closed"
        self.writers: dict = {}
        self.failed: str | None = None
        self.last = time.monotonic()
        self.changed = asyncio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
        for slot in self.slots.values():
            if not slot.fut.done():
                slot.fut.set_exception(_Refuse(why))
        self.notify()


def _write_private(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _writable_dir(d, what: str) -> Path:
    d = Path(d).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the {what} {d} ({e.strerror})") from None
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"the {what} {d} is not a writable folder")
    return d


class DealerServer:
    """The dealer's TLS server on its own event loop in a background thread.

    ``DealerServer("127.0.0.1:0", state_dir, out_dir).start()`` binds, writes the two connection
    files (``client_file``, ``server_file``) and serves until ``stop()``.
    """

    def __init__(self, listen: str = "127.0.0.1:0", state_dir=".cryptogen-dealer", out_dir=None,
                 max_links: int = DEFAULT_MAX_LINKS, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING, advertise: str | None = None,
                 record: bool = False, step_ahead_bytes: int = DEFAULT_STEP_AHEAD):
        self.host, self.port = split_address(str(listen))
        if advertise is not None and (not advertise.strip() or any(c.isspace() or c in "[]/" for c in advertise)):
            raise ValueError(f"--advertise must be a host name or address, got {advertise!r}")
        if int(max_links) < 1:
            raise ValueError(f"max_links must be at least 1, got {max_links}")
        if not float(idle_timeout) > 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        if int(max_pending_bytes) < 4096:
            raise ValueError(f"max_pending_bytes must be at least 4096, got {max_pending_bytes}")
        if int(step_ahead_bytes) < 0:
            raise ValueError(f"the step look-ahead must be 0 or more MiB, got {int(step_ahead_bytes) / (1 << 20):g}")
        self.step_ahead = int(step_ahead_bytes)  # announced at the hello: both parties ask alike (DEALER.md rule 3)
        self.state_dir, self.out_dir = Path(state_dir).expanduser(), Path(out_dir or state_dir).expanduser()
        self.max_links, self.idle_timeout = int(max_links), float(idle_timeout)
        self.max_pending = int(max_pending_bytes)
        self.max_request = min(MAX_REQUEST_BYTES, self.max_pending)
        self.max_conns = 2 * self.max_links + 8
        self.advertise = advertise
        self.record = record
        self.received: Counter = Counter()  # (dtype, shape) of every frame parties sent, if record
        self.made = 0
        self.refused = 0
        self._links: dict = {}
        self._writers: set = set()
        self._conns = 0
        self._loop = self._thread = self._server = self._janitor_task = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cryptogen-dealer-make")

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> "DealerServer":
        state = _writable_dir(self.state_dir, "state folder")
        out = _writable_dir(self.out_dir, "output folder for the connection files")
        hosts = tuple(h for h in ("localhost", "127.0.0.1", self.host, self.advertise) if h and h not in _WILDCARD)
        try:
            cert_pem, key_pem = ensure_certificate(state, hosts=hosts)
            ctx = server_context(cert_pem, key_pem)
            ctx.num_tickets = 0  # no session resumption: no post-handshake messages to the parties
        except (TLSError, OSError) as e:
            raise ValueError(f"cannot set up the dealer's TLS certificate in {state}: {e}") from None
        keys = self._role_keys(state / "dealer-keys.json")
        self._keys = {r: bytes.fromhex(keys[r]) for r in ROLES}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cryptogen-dealer", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._open(ctx), self._loop).result(30)
        except OSError as e:
            self._halt()
            raise ValueError(f"cannot listen on {self.host}:{self.port} ({e.strerror or e})") from None
        host = self.advertise or (socket.gethostname() if self.host in _WILDCARD else self.host)
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.fingerprint = fingerprint(cert_pem)
        self.files = {}
        for role in ROLES:
            path = out / f"dealer-{role}.json"
            try:
                _write_private(path, {"address": self.address, "cert": cert_pem, "fingerprint": self.fingerprint,
                                      "role": role, "key": keys[role]})
            except OSError as e:
                self.stop()
                raise ValueError(f"cannot write the connection file {path} ({e.strerror})") from None
            self.files[role] = path
        return self

    @property
    def client_file(self) -> Path:
        return self.files["client"]

    @property
    def server_file(self) -> Path:
        return self.files["server"]

    def connection(self, role: str) -> dict:
        return json.loads(self.files[role].read_text())

    @staticmethod
    def _role_keys(path: Path) -> dict:
        """The two role keys, kept across restarts (delete the file to rotate them)."""
        try:
            keys = json.loads(path.read_text())
            if all(isinstance(keys.get(r), str) and len(bytes.fromhex(keys[r])) == 32 for r in ROLES) \
                    and keys["client"] != keys["server"]:
                return keys
        except (OSError, ValueError, AttributeError):
            pass
        keys = {r: new_secret() for r in ROLES}
        try:
            _write_private(path, keys)
        except OSError as e:
            raise ValueError(f"cannot write the dealer's keys to {path} ({e.strerror})") from None
        return keys

    async def _open(self, ctx) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=ctx,
                                                  ssl_handshake_timeout=HELLO_TIMEOUT)
        self.port = self._server.sockets[0].getsockname()[1]
        self._janitor_task = asyncio.get_running_loop().create_task(self._janitor())

    def stop(self) -> None:
        """Stop listening, drop every connection and link, end the loop thread."""
        if self._loop is None or self._loop.is_closed():
            self._pool.shutdown(wait=False, cancel_futures=True)
            return

        async def _close():
            if self._janitor_task:
                self._janitor_task.cancel()
            if self._server:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for lk in self._links.values():
                lk.fail("the dealer is shutting down")
            self._links.clear()
            await asyncio.sleep(0.05)
        try:
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        except Exception:  # noqa: BLE001 - stopping is best effort
            pass
        self._halt()

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start() if self._loop is None else self

    def __exit__(self, *exc):
        self.stop()

    def stats(self) -> dict:
        """Public counters (links, open connections, items made, refused connections, pending bytes)."""
        async def _read():
            return dict(links=len(self._links), connections=self._conns, made=self.made, refused=self.refused,
                        pending_bytes=sum(lk.pending for lk in self._links.values()))
        return asyncio.run_coroutine_threadsafe(_read(), self._loop).result(10)

    # -- one connection --------------------------------------------------------------------
    async def _recv(self, reader, timeout: float, what: str):
        try:
            arr = await asyncio.wait_for(read_frame(reader, _IN_FRAME), timeout)
        except asyncio.TimeoutError:
            raise _Refuse(f"no {what} within {timeout:.0f} s") from None
        if self.record and arr is not None:
            self.received[(arr.dtype.str, arr.shape)] += 1
        return arr

    async def _send(self, writer, *arrays) -> None:
        await write_chunked(writer, b"".join(frame(np.ascontiguousarray(a)) for a in arrays), self.idle_timeout)

    async def _handle(self, reader, writer) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        lid = lk = role = None
        clean = False
        self._conns += 1
        self._writers.add(writer)
        tune_writes(writer)
        try:
            if self._conns > self.max_conns:
                raise _Refuse("the dealer has too many open connections; try again later")
            hello = await self._recv(reader, HELLO_TIMEOUT, "hello")
            if hello is None:
                clean = True
                return
            role, lid, t = self._authenticate(hello)
            lk = self._attach(lid, role, t, writer)
            await self._send(writer, np.array([OK, ROLES.index(role), self.max_request, self.step_ahead], np.int64))
            while True:
                req = await self._recv(reader, self.idle_timeout, "request")
                if req is None:
                    clean = True
                    break
                half = await self._serve(lk, role, req)
                await self._send(writer, np.array([OK, len(half)], np.int64), *half)
        except (_Refuse, ProviderError, ChannelError) as e:
            self.refused += 1
            log.info("dealer: ended a %s connection from %s: %s", role or "unauthenticated", peer, e)
            try:
                writer.write(b"".join(frame(a) for a in error_frames(str(e))))
                await asyncio.wait_for(writer.drain(), 5)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError):
            pass  # the peer vanished
        finally:
            self._conns -= 1
            self._writers.discard(writer)
            if lk is not None:
                self._detach(lid, lk, role, clean)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                writer.transport.abort()

    def _authenticate(self, hello) -> tuple:
        if hello.dtype != np.uint8 or hello.shape != (HELLO_BYTES,) or hello[:len(MAGIC)].tobytes() != MAGIC:
            raise _Refuse("malformed hello (not a cryptogen dealer client, or a different version)")
        raw = hello.tobytes()
        key, lid, t = raw[4:36], raw[36:68].hex(), int.from_bytes(raw[68:76], "little")
        match = [same_secret(key, self._keys[r]) for r in ROLES]  # both compared, every time
        if not any(match):
            raise _Refuse("wrong key: this connection file was not issued by this dealer (or its keys were rotated)")
        if not (2 < t < (1 << 42) and t % 2):
            raise _Refuse("the field modulus must be an odd number in (2, 2**42)")
        return ROLES[match.index(True)], lid, t

    def _attach(self, lid: str, role: str, t: int, writer) -> _Link:
        lk = self._links.get(lid)
        if lk is None:
            if len(self._links) >= self.max_links:
                raise _Refuse(f"the dealer serves at most {self.max_links} links at once; try again later")
            lk = self._links[lid] = _Link(t)
        elif lk.t != t:
            raise _Refuse("the two parties of this link use different field moduli")
        if role in lk.ends:
            raise _Refuse(f"this link already had a {role} end (each role connects to a link once)")
        lk.ends[role], lk.writers[role], lk.last = "open", writer, time.monotonic()
        return lk

    def _detach(self, lid: str, lk: _Link, role: str, clean: bool) -> None:
        lk.ends[role] = "closed"
        lk.writers.pop(role, None)
        if not clean:
            lk.fail(f"the {role} party went away (its link to the dealer was lost mid-session)")
        lk.notify()
        if "open" not in lk.ends.values() and (len(lk.ends) == 2 or lk.failed):
            self._forget(lid, lk)

    def _forget(self, lid: str, lk: _Link) -> None:
        if self._links.get(lid) is lk:
            del self._links[lid]

    # -- one request -----------------------------------------------------------------------
    async def _serve(self, lk: _Link, role: str, req) -> tuple:
        seq, kind, count, key, size = decode_request(req, lk.t, self.max_request)
        if lk.failed:
            raise _Refuse(lk.failed)
        if seq != lk.next_seq[role]:
            raise _Refuse(f"request {seq} out of order (expected {lk.next_seq[role]})")
        lk.next_seq[role] += 1
        lk.last = time.monotonic()
        spec = (kind, count, key)
        slot = lk.slots.get(seq)
        if slot is not None:  # the other role asked first: its batch holds this role's half
            if slot.spec != spec:
                lk.fail("the two parties requested different correlated randomness")
                raise _Refuse(lk.failed)
            half = await slot.fut
            lk.slots.pop(seq, None)
            lk.pending -= slot.size
            lk.notify()
            return half
        other = ROLES[1 - ROLES.index(role)]
        if lk.ends.get(other) == "closed":
            raise _Refuse(f"the {other} party has closed its link after fewer requests than this one")
        loop = asyncio.get_running_loop()
        slot = lk.slots[seq] = _Slot(spec, size, loop.create_future())
        await self._room(lk, size)
        lk.pending += size
        try:
            pair = await loop.run_in_executor(self._pool, lk.dealer.make, kind, count, key)
        except Exception:  # noqa: BLE001 - a failure to make randomness ends the link, not the dealer
            log.exception("dealer: making a %s batch failed", kind)
            lk.fail("the dealer failed to make a batch")
            raise _Refuse(lk.failed) from None
        if slot.fut.done():  # the link failed meanwhile
            raise _Refuse(lk.failed or "the link ended")
        mine, theirs = pair if role == "client" else pair[::-1]
        slot.fut.set_result(tuple(theirs[f] for f in _FIELDS[kind]))
        self.made += count
        lk.last = time.monotonic()
        return tuple(mine[f] for f in _FIELDS[kind])

    async def _room(self, lk: _Link, size: int) -> None:
        """Wait (up to the idle timeout) until this link's pending halves leave room for ``size``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_timeout
        while lk.failed is None and lk.pending + size > self.max_pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                lk.fail(f"the other party stayed more than {self.max_pending} bytes behind for "
                        f"{self.idle_timeout:.0f} s")
                break
            try:
                await asyncio.wait_for(lk.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        if lk.failed:
            raise _Refuse(lk.failed)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 4))
            now = time.monotonic()
            for lid, lk in list(self._links.items()):
                if now - lk.last > self.idle_timeout:
                    lk.fail(f"the link was idle for more than {self.idle_timeout:.0f} s")
                    for w in list(lk.writers.values()):
                        w.transport.abort()
                    self._forget(lid, lk)


def run_dealer(listen: str, state_dir: str, out_dir: str, max_links: int = DEFAULT_MAX_LINKS,
               idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_pending_bytes: int = DEFAULT_MAX_PENDING,
               advertise: str | None = None, step_ahead_bytes: int = DEFAULT_STEP_AHEAD) -> None:
    """``cryptogen dealer``: serve until SIGINT/SIGTERM. ValueError (one line) on bad input."""
    server = DealerServer(listen, state_dir, out_dir, max_links=max_links, idle_timeout=idle_timeout,
                          max_pending_bytes=max_pending_bytes, advertise=advertise,
                          step_ahead_bytes=step_ahead_bytes).start()
    print(f"dealer listening on {server.address} ({server.fingerprint}); connection files: "
          f"client {server.client_file}, server {server.server_file}", flush=True)
    stop = threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        server.stop()
