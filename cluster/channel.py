"""The 2PC/HE ``Channel`` between a client actor and a server worker: a direct TCP stream.

Protocols exchange thousands of small messages per token (a LayerNorm alone is ~120
rounds), so messages do not go through Ray calls (~1-5 ms each here) but over one TCP
connection per (session, worker) link, set up through Ray: the worker listens, the
client dials. On one node the link uses 127.0.0.1; across nodes the worker's node IP.
Framing is a fixed header (dtype code, rank, shape) plus the raw array bytes: no pickle,
so a peer can only ever send arrays of the four dtypes the protocols use.

Sends are queued to one sender thread per channel, in order. Both parties of a symmetric step
(an opening: send mine, then receive theirs) send at the same time; with a blocking send, two
messages larger than the kernel's socket buffers (a 2PC LayerNorm over a 128-token window sends
several MB each way) wait for each other forever. The queue makes a send return at once.
"""
from __future__ import annotations

import queue
import socket
import struct
import threading

import numpy as np

from cryptogen.mpc.channel import Channel
from cryptogen.mpc.errors import ChannelError

_DTYPES = [np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.float64), np.dtype(np.bool_)]
_HEAD = struct.Struct("<BB")
_MAX_RANK = 8
_CLOSE = 255


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError("the peer closed the connection (it failed or finished early)")
        got += k
    return bytes(buf)


# How long a party waits for its peer to send or to read. A peer that dies closes its socket,
# which is seen at once, and a dead actor is reported by Ray, so this only bounds a peer that hangs.
IDLE_TIMEOUT = 300.0


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket, timeout: float = IDLE_TIMEOUT):
        super().__init__()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        self.sock, self.timeout = sock, timeout
        self._outbox: queue.Queue = queue.Queue()
        self._send_error: ChannelError | None = None
        self._sender = threading.Thread(target=self._send_loop, name="channel-send", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        while (data := self._outbox.get()) is not None:
            if self._send_error is not None:
                continue  # the link is broken: drop the rest (the next send/recv raises)
            try:
                self.sock.sendall(data)
            except socket.timeout:
                self._send_error = ChannelError(f"the peer read nothing within {self.timeout:.0f} s (it may hang)")
            except OSError as e:
                self._send_error = ChannelError(f"send failed: {e.__class__.__name__}")

    def _send_raw(self, arr: np.ndarray) -> None:
        if arr.dtype not in _DTYPES or arr.ndim > _MAX_RANK:
            raise ChannelError(f"cannot send an array of dtype {arr.dtype} and rank {arr.ndim}")
        self._raise_send_error()
        head = _HEAD.pack(_DTYPES.index(arr.dtype), arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
        self._outbox.put(head + np.ascontiguousarray(arr).tobytes())

    def _raise_send_error(self) -> None:
        if self._send_error is not None:
            raise self._send_error

    def _recv_raw(self) -> np.ndarray:
        try:
            code, rank = _HEAD.unpack(_recv_exact(self.sock, _HEAD.size))
            if code == _CLOSE:
                raise ChannelError("the peer closed the channel (it failed or finished early)")
            if code >= len(_DTYPES) or rank > _MAX_RANK:
                raise ChannelError("malformed message header from the peer")
            shape = struct.unpack(f"<{rank}q", _recv_exact(self.sock, 8 * rank))
            if any(s < 0 for s in shape):
                raise ChannelError("malformed message shape from the peer")
            dtype = _DTYPES[code]
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            return np.frombuffer(_recv_exact(self.sock, n), dtype=dtype).reshape(shape)
        except socket.timeout:
            self._raise_send_error()
            raise ChannelError(f"no message from the peer within {self.timeout:.0f} s (it may have died)") from None
        except OSError as e:
            self._raise_send_error()
            raise ChannelError(f"receive failed: {e.__class__.__name__}") from None

    def close(self) -> None:
        """Flush the queued sends (bounded by the idle timeout), say goodbye, close the socket."""
        self._outbox.put(_HEAD.pack(_CLOSE, 0))
        self._outbox.put(None)
        self._sender.join(self.timeout)
        self.sock.close()

    def abort(self) -> None:
        """Unblock a receive waiting on a dead peer (from another thread)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Listener:
    """Worker side: a listening socket for one link; ``accept`` returns the channel."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]

    def accept(self, timeout: float = 120.0) -> SocketChannel:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except socket.timeout:
            raise ChannelError(f"the client did not connect to {self.host}:{self.port} within {timeout:.0f} s") from None
        finally:
            self.sock.close()
        return SocketChannel(conn)


def dial(host: str, port: int, timeout: float = 30.0) -> SocketChannel:
    try:
        return SocketChannel(socket.create_connection((host, port), timeout=timeout))
    except OSError as e:
        raise ChannelError(f"cannot connect to worker at {host}:{port}: {e.__class__.__name__}") from None


def link_host(my_ip: str, peer_ip: str) -> str:
    """Loopback when both ends share a node, else this node's address."""
    return "127.0.0.1" if my_ip == peer_ip else my_ip
