"""Transport-agnostic point-to-point channel between the client and the server.

A channel moves numpy arrays in order, both ways, and counts what it moved: bytes,
messages and rounds, per phase (``online`` by default, ``offline`` for correlated
randomness generation). One *round* is one flight of messages: a party's send after
it has received (or its very first send) starts a new round, so a simultaneous
exchange (both send, then both receive) costs one round for each party.

Implementations only provide ``_send_raw`` / ``_recv_raw`` / ``close``. The in-memory
pair below connects two threads of one process; the TLS link between the user's client and a
server worker (``cryptogen.net.channel.TLSChannel``) implements the same methods.
"""
from __future__ import annotations

import contextlib
import queue
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .errors import ChannelError, ShapeError

_CLOSED = object()


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

    def _send_raw(self, arr):
        self._outbox.put(arr.copy())

    def _recv_raw(self):
        try:
            msg = self._inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise ChannelError(f"no message from the peer within {self.timeout:.0f} s") from None
        if msg is _CLOSED:
            raise ChannelError("the peer closed the channel (it failed or finished early)")
        return msg

    def close(self):
        self._outbox.put(_CLOSED)


def channel_pair(timeout: float = 120.0, record: bool = False):
    """(client_end, server_end) of an in-memory channel for two threads of one process."""
    a, b = queue.Queue(), queue.Queue()
    return (InMemoryChannel(a, b, timeout, record), InMemoryChannel(b, a, timeout, record))

