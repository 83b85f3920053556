"""A worker's data-link listener: one TLS port per worker for every session's links.

The gateway hands a session's per-link tokens (256-bit, random) to the worker and, over the
authenticated control connection, to the client. The client dials the worker, completes TLS
(the worker presents the server certificate the client pinned) and sends its link token as the
first frame. A connection whose first frame is not a pending token (a hijacker who connects
first, a replay, garbage) is closed at once and the link stays open for the real client: each
token is claimed once. Tokens are looked up by their SHA-256, so the lookup's timing says
nothing about a token's value.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading

import numpy as np

from cryptogen.mpc.errors import ChannelError
from cryptogen.net.channel import TLSChannel, io_loop, read_frame, run
from cryptogen.net.tls import server_context

TOKEN_BYTES = 64  # hex of a 256-bit token
FIRST_FRAME_TIMEOUT = 10.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LinkServer:
    def __init__(self, bind_host: str, cert_pem: str, key_pem: str, max_frame: int, idle_timeout: float = 300.0):
        self.max_frame, self.idle_timeout = max_frame, idle_timeout
        self._ctx = server_context(cert_pem, key_pem)
        self._lock = threading.Lock()
        self._pending: dict[str, asyncio.Future] = {}  # sha256(token) -> future of the channel
        self.rejected = 0
        self.server = run(asyncio.start_server(self._on_connect, bind_host, 0, ssl=self._ctx,
                                               ssl_handshake_timeout=FIRST_FRAME_TIMEOUT))
        self.host, self.port = self.server.sockets[0].getsockname()[:2]

    def expect(self, tokens) -> None:
        """Register tokens whose connections will be accepted (once each)."""
        loop = io_loop()
        with self._lock:
            for t in tokens:
                self._pending[_digest(t)] = loop.create_future()

    def wait(self, token: str, timeout: float) -> TLSChannel:
        """The channel of the connection that presented ``token`` (blocks up to ``timeout``)."""
        with self._lock:
            fut = self._pending.get(_digest(token))
        if fut is None:
            raise ChannelError("unknown link token")

        async def _wait():
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        try:
            return run(_wait(), timeout + 5)
        except (asyncio.TimeoutError, TimeoutError):
            raise ChannelError(f"the client did not open its data link within {timeout:.0f} s") from None
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            raise ChannelError("the session was closed before its data link opened") from None
        finally:
            with self._lock:
                self._pending.pop(_digest(token), None)

    def forget(self, tokens) -> None:
        with self._lock:
            for t in tokens:
                fut = self._pending.pop(_digest(t), None)
                if fut is not None and not fut.done():
                    io_loop().call_soon_threadsafe(fut.cancel)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(read_frame(reader, TOKEN_BYTES), FIRST_FRAME_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ChannelError, OSError):
            first = None
        fut = None
        if isinstance(first, np.ndarray) and first.dtype == np.uint8 and first.shape == (TOKEN_BYTES,):
            with self._lock:
                fut = self._pending.get(_digest(first.tobytes().decode("ascii", "replace")))
        if fut is None or fut.done():
            self.rejected += 1
            writer.transport.abort()
            return
        fut.set_result(TLSChannel(reader, writer, max_frame=self.max_frame, timeout=self.idle_timeout))
