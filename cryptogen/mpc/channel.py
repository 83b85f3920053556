"""Transport-agnostic point-to-point channel between the client and the server.

A channel moves numpy arrays in order, both ways, and counts what it moved: bytes,
messages and rounds, per phase (``online`` by default, ``offline`` for correlated
randomness generation). One *round* is one flight of messages: a party's send after
it has received (or its very first send) starts a new round, so a simultaneous
exchange (both send, then both receive) costs one round for each party.

Implementations only provide ``_send_raw`` / ``_recv_raw`` / ``close`` / ``abort``. The in-memory
pair below connects two threads of one process; the TLS link between the user's client and a
server worker (``cryptogen.net.channel.TLSChannel``) implements the same methods.

A failure on either side of a link aborts the peer at once: whoever runs a party's code wraps it
in :func:`abort_on_error` (``simulate`` does), so when that code raises, its links are aborted
and the peer's blocked (or next) ``recv`` raises ``ChannelError`` ("the peer failed") right away
instead of waiting out the channel's timeout.
"""
from __future__ import annotations

import contextlib
import queue
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .errors import ChannelError, ShapeError

_CLOSED = object()


class _Aborted:
    """Queue marker: the link was aborted (by the peer, or by this end)."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class PhaseStats:
    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    rounds: int = 0

    def as_dict(self) -> dict:
        return dict(bytes_sent=self.bytes_sent, bytes_recv=self.bytes_recv,
                    msgs_sent=self.msgs_sent, rounds=self.rounds)


@dataclass
class ChannelStats:
    phases: dict = field(default_factory=lambda: defaultdict(PhaseStats))

    def __getitem__(self, phase: str) -> PhaseStats:
        return self.phases[phase]

    def as_dict(self) -> dict:
        return {k: v.as_dict() for k, v in self.phases.items()}


class Channel:
    """Base class: ordered, reliable delivery of numpy arrays to the peer, with counters."""

    def __init__(self, record: bool = False):
        self.stats = ChannelStats()
        self._phase = "online"
        self._last_was_recv = True
        self.record = record
        self.transcript: list[np.ndarray] = []  # everything received, if record=True
        self.opened: list[np.ndarray] = []      # every value opened to this party, if record=True

    # --- to implement -------------------------------------------------------------
    def _send_raw(self, arr: np.ndarray) -> None:
        raise NotImplementedError

    def _recv_raw(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Tell the peer no more messages will come (its recv raises ChannelError)."""

    def abort(self) -> None:
        """This side failed: drop the link now (from any thread); the peer's receive fails at once.
        Implementations also fail a receive blocked on this end; the default only closes."""
        self.close()

    # --- public API -------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute the traffic inside the block to phase ``name``."""
        old, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = old

    def send(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        st = self.stats[self._phase]
        if self._last_was_recv:
            st.rounds += 1
            self._last_was_recv = False
        st.bytes_sent += arr.nbytes
        st.msgs_sent += 1
        self._send_raw(arr)

    def recv(self, shape: tuple | None = None, dtype=None) -> np.ndarray:
        arr = self._recv_raw()
        self._last_was_recv = True
        self.stats[self._phase].bytes_recv += arr.nbytes
        if self.record:
            self.transcript.append(arr.copy())
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ShapeError(f"peer sent shape {tuple(arr.shape)}, expected {tuple(shape)} "
                             "(the parties disagree on operand shapes)")
        if dtype is not None and arr.dtype != np.dtype(dtype):
            raise ShapeError(f"peer sent dtype {arr.dtype}, expected {np.dtype(dtype)}")
        return arr


class InMemoryChannel(Channel):
    """One end of a queue pair; use :func:`channel_pair` to make both ends."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout: float = 120.0,
                 record: bool = False):
        super().__init__(record=record)
        self._inbox, self._outbox, self.timeout = inbox, outbox, timeout

        self._aborted: _Aborted | None = None

    def _send_raw(self, arr):
        if self._aborted is not None:
            raise ChannelError(self._aborted.reason)
        self._outbox.put(arr.copy())

    def _recv_raw(self):
        if self._aborted is not None:
            raise ChannelError(self._aborted.reason)
        try:
            msg = self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise ChannelError(f"no message from the peer within {self.timeout:.0f} s") from None
        if msg is _CLOSED:
            raise ChannelError("the peer closed the channel (it failed or finished early)")
        if isinstance(msg, _Aborted):
            self._aborted = msg  # every later send/recv on this end fails the same way
            raise ChannelError(msg.reason)
        return msg

    def close(self):
        self._outbox.put(_CLOSED)

    def abort(self):
        """The peer's receive fails at once ("the peer failed"), and so does one blocked on this end."""
        if self._aborted is not None:
            return
        self._aborted = _Aborted("the link was aborted by this party (it failed)")
        self._outbox.put(_Aborted("the peer failed: it aborted the link"))
        self._inbox.put(self._aborted)  # wakes a receive blocked on this end in another thread


@contextlib.contextmanager
def abort_on_error(*channels: Channel):
    """Run one party's part of a protocol: if it raises, abort ``channels`` (its links) so that every
    peer blocked on them fails at once with ChannelError instead of waiting out its timeout. Use it
    in every thread or process that runs a party: ``with abort_on_error(party.chan): fn(party)``."""
    try:
        yield
    except BaseException:
        for ch in channels:
            try:
                ch.abort()
            except Exception:  # noqa: BLE001 - aborting a broken link is best effort
                pass
        raise


def channel_pair(timeout: float = 120.0, record: bool = False):
    """(client_end, server_end) of an in-memory channel for two threads of one process."""
    a, b = queue.Queue(), queue.Queue()
    return (InMemoryChannel(a, b, timeout, record), InMemoryChannel(b, a, timeout, record))

