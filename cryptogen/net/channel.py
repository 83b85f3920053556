"""The 2PC/HE ``Channel`` over TLS: framed numpy arrays, size-capped, on a background asyncio loop.

Every client<->server link (the control connection and each per-worker data link) is one TLS
stream. TLS runs in one event-loop thread per process (``asyncio``'s SSL transport), so no SSL
object is ever touched by two threads; the protocol code stays blocking:

- ``send`` queues the frame on the loop and returns at once (both parties of an opening send
  before they read: a blocking send of two large messages would deadlock); a writer task hands
  it to TLS in ``WRITE_CHUNK`` pieces, each drained before the next (``write_chunked``);
- a ``FrameReceiver`` (``frames.py``) takes the link's transport after the handshake and parses
  frames as TLS decrypts them, straight into their arrays, into an inbox; ``recv`` takes the next one.

Frames (``frames.py``) are typed numpy arrays, no pickle. A frame larger than the link's cap (derived
from the protocol's largest message) is refused from its header, before any buffer is allocated; the
link then ends with a ``ChannelError`` naming the sizes. A peer that runs more than ``max_ahead``
bytes ahead of the consumer is not read from until it catches up (TCP back-pressure).
"""
from __future__ import annotations

import asyncio
import atexit
import os
import queue
import sys
import threading

import numpy as np

from cryptogen.mpc.channel import Channel
from cryptogen.mpc.errors import ChannelError

from .frames import GOODBYE, FrameReceiver, frame, read_frame  # noqa: F401 - frame, read_frame: re-exported
from .tls import check_pin, client_context

IDLE_TIMEOUT = 300.0  # a peer that hangs (one that dies closes its socket, seen at once)
DEFAULT_MAX_FRAME = 64 << 20

# Test hook: if set, called with every frame's bytes this process sends (after framing, before TLS).
SEND_TAP = None

# asyncio's SSL transport encrypts all it is given into a memory BIO at once, and stops reading that BIO
# while the socket's buffer is over its high-water mark: frames handed over faster than the socket
# drains grow the BIO by reallocation and are copied again on the way out. In pieces of 1 MiB, each
# drained first, the sender spends 3-4x less CPU (400 MiB over loopback in 1-8 MiB frames: 2.5-3.1 ->
# 0.7-0.8 s, 105-141 -> 305-470 MiB/s; scripts/bench_tls.py). 256 KiB pieces made GPT-2 base's Ray
# step slower (33.8 against 29.5 s at 511 context, more event-loop turns; docs/BENCHMARKS.md).
WRITE_CHUNK = 1 << 20
WRITE_HIGH_WATER = 4 << 20


async def write_chunked(writer: asyncio.StreamWriter, data, timeout: float | None = None) -> None:
    """``data`` to the stream in ``WRITE_CHUNK`` pieces, each drained before the next."""
    mv = memoryview(data)
    for i in range(0, len(mv), WRITE_CHUNK):
        writer.write(mv[i:i + WRITE_CHUNK])
        await asyncio.wait_for(writer.drain(), timeout)


def tune_writes(writer: asyncio.StreamWriter) -> None:
    """A high-water mark that lets a few pieces queue in the socket's transport."""
    try:
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    except (AttributeError, NotImplementedError, RuntimeError):
        pass


# The TLS loop releases the GIL in every SSL read (one TLS record, 16 KiB) and must take it back
# before the next. While another thread runs Python code, taking it back waits for that thread's
# switch interval, 5 ms by default: 16 KiB per 5 ms. Over loopback, with a thread in a Python loop in
# the receiving process, a link received 8.4 MiB/s at 5 ms and 100-390 MiB/s at 0.2 ms
# (scripts/bench_tls.py --compare reads --busy py; docs/BENCHMARKS.md). A process that starts the
# loop sets the interval to SWITCH_INTERVAL_US (0 keeps Python's own).
SWITCH_ENV = "CRYPTOGEN_SWITCH_INTERVAL_US"
SWITCH_INTERVAL_US = 200


def switch_interval_us() -> int:
    raw = os.environ.get(SWITCH_ENV, "")
    return int(raw) if raw.isdigit() else SWITCH_INTERVAL_US


class IdleTimeout(ChannelError):
    """The peer sent nothing within the link's idle timeout."""


class _Loop:
    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                us = switch_interval_us()
                if us:
                    sys.setswitchinterval(us / 1e6)
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="cryptogen-tls", daemon=True).start()
                cls._loop = loop
                atexit.register(cls._stop, loop)
            return cls._loop

    @staticmethod
    def _stop(loop) -> None:
        """At exit: cancel the links' reader tasks and stop the loop (no 'task destroyed' noise)."""
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(2)
            loop.call_soon_threadsafe(loop.stop)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def io_loop() -> asyncio.AbstractEventLoop:
    """The process's TLS event loop (started on first use)."""
    return _Loop.get()


def run(coro, timeout: float | None = None):
    """Run a coroutine on the TLS loop from a blocking thread."""
    return asyncio.run_coroutine_threadsafe(coro, io_loop()).result(timeout)


def keepalive(writer) -> None:
    """TCP keepalive on a link's socket: a peer that vanishes without closing is noticed in ~1 min."""
    import socket
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, val in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    except OSError:
        pass


class TLSChannel(Channel):
    """One end of a TLS link. Build with :func:`dial` (client) or from a server's accepted streams.

    The streams are only for the handshake: on the event loop the link's transport is handed to a
    ``FrameReceiver`` (frames decrypted straight into their arrays) with whatever the stream had read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = DEFAULT_MAX_FRAME, timeout: float = IDLE_TIMEOUT, record: bool = False,
                 max_ahead: int | None = None):
        super().__init__(record=record)
        self.writer, self.max_frame, self.timeout = writer, max_frame, timeout
        self.loop = io_loop()
        self.max_ahead = max_ahead if max_ahead is not None else max(4 * max_frame, 256 << 20)
        self._inbox: queue.Queue = queue.Queue()
        self._buffered = 0  # bytes parsed but not yet received (both threads: under _count_lock)
        self._reading_paused = False  # the consumer is behind by over max_ahead (under _count_lock)
        self._count_lock = threading.Lock()
        keepalive(writer)
        self._closed = False
        self.peer_gone = False  # set when the peer closed, failed, or broke the framing
        self._outbox: asyncio.Queue = asyncio.Queue()  # frames to send, in order (None: the goodbye)
        self._mid_frame = False  # the writer task has handed part of a frame to TLS
        self._link = FrameReceiver(lambda: self.max_frame, self._on_frame, self._on_end,
                                   lambda: self._outbox.put_nowait(b""))  # wakes the writer task: it ends
        self._writing = asyncio.run_coroutine_threadsafe(self._run(reader), self.loop)

    async def _run(self, reader: asyncio.StreamReader) -> None:
        self._link.attach(self.writer.transport, reader)
        await self._write_loop()

    async def _write_loop(self) -> None:
        """Frames to TLS in pieces (``write_chunked``); on the goodbye: flush, say it, close."""
        tune_writes(self.writer)
        try:
            while True:
                data = await self._outbox.get()
                if self.writer.is_closing():
                    return
                if data is None:
                    self._link.write(GOODBYE)
                    await asyncio.wait_for(self._link.drain(), self.timeout)
                    self.writer.close()
                    return
                self._mid_frame = True
                await write_chunked(self._link, data)
                self._mid_frame = False
        except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # the peer went away: its end (and this one's reader) see the link end

    def _on_frame(self, arr: np.ndarray) -> None:
        """On the loop: a whole frame in; stop reading while the consumer is over max_ahead behind
        (TCP back-pressure)."""
        with self._count_lock:
            self._buffered += arr.nbytes
            pause = self._buffered > self.max_ahead and not self._reading_paused
            self._reading_paused |= pause
        if pause:
            self.writer.transport.pause_reading()
        self._inbox.put(arr)

    def _on_end(self, err: ChannelError) -> None:
        self.peer_gone = True
        self._inbox.put(err)

    def _send_raw(self, arr: np.ndarray) -> None:
        self.send_bytes(frame(arr))

    def send_bytes(self, data: bytes) -> None:
        if self._closed:
            raise ChannelError("the channel is closed")
        if SEND_TAP is not None:
            SEND_TAP(data)
        self.loop.call_soon_threadsafe(self._outbox.put_nowait, data)

    def _recv_raw(self) -> np.ndarray:
        try:
            item = self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise IdleTimeout(f"no message from the peer within {self.timeout:.0f} s (it may have died)") from None
        if isinstance(item, BaseException):
            self._inbox.put(item)  # every later recv fails the same way
            raise item
        with self._count_lock:
            self._buffered -= item.nbytes
            resume = self._reading_paused and self._buffered <= self.max_ahead
            self._reading_paused &= not resume
        if resume:
            self.loop.call_soon_threadsafe(self.writer.transport.resume_reading)
        return item

    def close(self) -> None:
        """Flush what was sent, say goodbye, close (bounded by the idle timeout)."""
        if self._closed:
            return
        self._closed = True

        async def _close():
            self._outbox.put_nowait(None)  # after every frame sent before
            await asyncio.wait_for(asyncio.wrap_future(self._writing), self.timeout)
            if not self.writer.is_closing():
                self.writer.close()
        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(self.timeout + 5)
        except Exception:  # noqa: BLE001 - closing a broken link is best effort
            self.abort()

    def abort(self) -> None:
        """Drop the link now (from any thread): the peer's and this end's receives fail at once."""
        self._closed = True
        self.loop.call_soon_threadsafe(self._abort_now)
        self._inbox.put(ChannelError("the link was aborted"))

    def _abort_now(self) -> None:
        """On the loop: frames still queued go to the transport as they are, unless a frame is half
        written (a last short message, such as the server's shutdown notice, leaves with the socket's
        first send), then the connection drops."""
        self._writing.cancel()
        while not self._outbox.empty():
            data = self._outbox.get_nowait()
            if data is not None and not self._mid_frame and not self.writer.is_closing():
                self.writer.write(data)
        self.writer.transport.abort()


def dial(host: str, port: int, cert_pem: str, pin: str, max_frame: int = DEFAULT_MAX_FRAME,
         timeout: float = 30.0, what: str = "the server") -> TLSChannel:
    """Client side: TLS to host:port, the server certificate checked against the pin."""
    ctx = client_context(cert_pem)

    async def _open():
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
        try:
            # on the loop thread: the SSL object is not thread-safe (a TLS 1.3 session ticket being
            # read there at the same time makes getpeercert fail with "handshake not done yet")
            check_pin(writer.get_extra_info("ssl_object"), pin)
        except Exception:
            writer.transport.abort()
            raise
        return reader, writer
    try:
        reader, writer = run(_open(), timeout + 5)
    except (OSError, asyncio.TimeoutError) as e:
        reason = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or e.__class__.__name__)
        raise ChannelError(f"cannot connect to {what} at {host}:{port}: {reason}") from None
    return TLSChannel(reader, writer, max_frame=max_frame)
