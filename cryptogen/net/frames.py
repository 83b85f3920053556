"""The frames of every TLS link, and the receiving half of a link as asyncio's buffered protocol.

Frame: dtype code (u8), rank (u8), shape (rank x i64), raw bytes. No pickle: a peer can only send
arrays of the four dtypes the protocols use. A frame larger than the link's cap is refused from its
header, before any buffer is allocated. Code 255 with rank 0 is the goodbye.

``FrameReceiver`` parses frames as TLS hands them over. Its payload goes straight into the array it
becomes: asyncio's SSL layer decrypts into the buffer that ``get_buffer`` returns, so a large frame
costs no bytes object per TLS record, no stream buffer and no copies out of it. Over loopback, the
receiving process spent 0.20-0.22 s of CPU on 400 MiB in 1 or 8 MiB frames, against 0.72-0.82 s
through an ``asyncio.StreamReader`` (``scripts/bench_tls.py --compare reads``; docs/BENCHMARKS.md,
"Receiving straight into frames").

It is also the link's writer for ``write_chunked``: ``write`` and a ``drain`` that waits while the
transport is over its high-water mark.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Callable

import numpy as np

from cryptogen.mpc.errors import ChannelError

DTYPES = [np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.float64), np.dtype(np.bool_)]
HEAD = struct.Struct("<BB")
MAX_RANK = 8
CLOSE = 255
GOODBYE = HEAD.pack(CLOSE, 0)
SCRATCH = 256 << 10  # what TLS decrypts into between frame payloads (headers, small frames)
DIRECT_MIN = 16 << 10  # a payload with at least this much left is decrypted into its array directly


def frame(arr: np.ndarray) -> bytes:
    if arr.dtype not in DTYPES or arr.ndim > MAX_RANK:
        raise ChannelError(f"cannot send an array of dtype {arr.dtype} and rank {arr.ndim}")
    head = HEAD.pack(DTYPES.index(arr.dtype), arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
    return b"".join((head, np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))  # one copy, not two


def check_head(code: int, rank: int) -> None:
    if code >= len(DTYPES) or rank > MAX_RANK:
        raise ChannelError("malformed message header from the peer")


def payload_size(code: int, shape: tuple, max_frame: int) -> int:
    """Bytes of the payload; ChannelError for a negative dimension or a frame over the cap."""
    if any(s < 0 for s in shape):
        raise ChannelError("malformed message shape from the peer")
    dtype = DTYPES[code]
    n = dtype.itemsize
    for s in shape:
        n *= s
        if n > max_frame:
            raise ChannelError(f"the peer sent a frame of shape {tuple(shape)} ({dtype}), over this link's cap "
                               f"of {max_frame} bytes")
    return n


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> np.ndarray | None:
    """One frame from a stream, or None for the peer's goodbye (the dealer's service and link tokens)."""
    code, rank = HEAD.unpack(await reader.readexactly(HEAD.size))
    if code == CLOSE:
        return None
    check_head(code, rank)
    shape = struct.unpack(f"<{rank}q", await reader.readexactly(8 * rank))
    n = payload_size(code, shape, max_frame)
    return np.frombuffer(await reader.readexactly(n), dtype=DTYPES[code]).reshape(shape)


class FrameReceiver(asyncio.BufferedProtocol):
    """One link's protocol once its TLS handshake is done (``attach``).

    ``on_frame(arr)`` gets every frame in order; ``on_end(err)`` gets one ``ChannelError`` when the
    link ends (the goodbye, the connection closing, a malformed or oversized frame), after which
    nothing more is delivered; ``on_lost()`` runs when the connection has closed, whatever ended the
    link before. All run on the event loop. ``cap()`` is the link's frame cap now (a
    server raises it once a client has authenticated).
    """

    def __init__(self, cap: Callable[[], int], on_frame: Callable[[np.ndarray], None],
                 on_end: Callable[[ChannelError], None], on_lost: Callable[[], None] = lambda: None):
        self._cap, self._on_frame, self._on_end, self._on_lost = cap, on_frame, on_end, on_lost
        self._scratch = memoryview(bytearray(SCRATCH))
        self._head = bytearray()  # the current frame's header bytes so far
        self._arr: np.ndarray | None = None  # the frame being filled,
        self._body: memoryview | None = None  # its bytes,
        self._got = 0  # and how many of them are in
        self._direct = False  # the last buffer handed out was the payload itself
        self.ended = False
        self.transport = None
        self._write_paused = False
        self._drain: asyncio.Future | None = None

    def attach(self, transport, reader: asyncio.StreamReader) -> None:
        """Take over ``transport`` from its stream protocol, with what ``reader`` already holds.
        On the event loop, so no data arrives between the two."""
        self.transport = transport
        transport.set_protocol(self)
        transport.resume_reading()  # the stream stops reading while it holds over 2 x its limit
        held = bytes(reader._buffer)  # noqa: SLF001 - frames that arrived before the hand-over
        reader._buffer.clear()  # noqa: SLF001
        if held:
            self._take(memoryview(held))
        if reader.exception() is not None:
            self.connection_lost(reader.exception())
        elif reader.at_eof() or transport.is_closing():
            self.connection_lost(None)

    # ---- receiving ----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        self._direct = self._body is not None and len(self._body) - self._got >= DIRECT_MIN
        return self._body[self._got:] if self._direct else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.ended:
            return
        if self._direct:
            self._got += nbytes
            if self._got == len(self._body):
                self._deliver()
            return
        self._take(self._scratch[:nbytes])

    def _take(self, mv: memoryview) -> None:
        """Parse ``mv``; a malformed or oversized frame ends the link and drops the connection."""
        try:
            self._parse(mv)
        except ChannelError as e:
            self._end(e)
            self.transport.abort()

    def _parse(self, mv: memoryview) -> None:
        i, n = 0, len(mv)
        while i < n and not self.ended:
            if self._body is not None:
                k = min(len(self._body) - self._got, n - i)
                self._body[self._got:self._got + k] = mv[i:i + k]
                self._got, i = self._got + k, i + k
                if self._got == len(self._body):
                    self._deliver()
                continue
            need = HEAD.size if len(self._head) < HEAD.size else HEAD.size + 8 * self._head[1]
            k = min(need - len(self._head), n - i)
            self._head += mv[i:i + k]
            i += k
            if len(self._head) == need:
                self._header_part()

    def _header_part(self) -> None:
        code, rank = self._head[0], self._head[1]
        if len(self._head) == HEAD.size:
            if code == CLOSE:
                self._end(ChannelError("the peer closed the channel (it failed or finished early)"))
                return
            check_head(code, rank)
            if rank:
                return  # the shape comes next
        shape = struct.unpack_from(f"<{rank}q", self._head, HEAD.size)
        payload_size(code, shape, self._cap())
        self._head.clear()
        self._arr = np.empty(shape, DTYPES[code])
        self._body, self._got = memoryview(self._arr.reshape(-1).view(np.uint8)), 0
        if not len(self._body):
            self._deliver()

    def _deliver(self) -> None:
        arr, self._arr, self._body = self._arr, None, None
        self._on_frame(arr)

    def _end(self, err: ChannelError) -> None:
        if not self.ended:
            self.ended = True
            self._on_end(err)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says it

    def connection_lost(self, exc) -> None:
        if exc is None:
            self._end(ChannelError("the peer closed the connection (it failed or finished early)"))
        else:
            self._end(ChannelError(f"receive failed: {exc.__class__.__name__}"))
        self._wake(ConnectionResetError("the link is closed"))
        self._on_lost()

    # ---- writing (the writer ``write_chunked`` takes) -----------------------------------------
    def write(self, data) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the link is closed")
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(None)

    def _wake(self, exc) -> None:
        fut, self._drain = self._drain, None
        if fut is not None and not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(None)
