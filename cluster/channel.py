"""The 2PC/HE ``Channel`` over Ray: client actor <-> server worker, point to point.

Each actor owns a :class:`Mailbox`; sending is a fire-and-forget ``deliver`` call on the
peer actor (one hop, no driver in between), receiving blocks on the local mailbox. Actors
run with ``max_concurrency > 1`` so ``deliver`` is served while a protocol thread waits.
Threaded actors may run calls out of order, so every message carries a sequence number
and the mailbox hands them out in order. Messages are numpy arrays (ciphertexts travel
as ``uint8`` arrays of their serialized bytes).
"""
from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np

from cryptogen.mpc.channel import Channel
from cryptogen.mpc.errors import ChannelError

_CLOSED = "closed"


class Mailbox:
    """Per-actor inboxes keyed by link name; each link delivers in sequence order."""

    def __init__(self):
        self._cond = threading.Condition()
        self._msgs: dict[str, dict[int, object]] = defaultdict(dict)
        self._next: dict[str, int] = defaultdict(int)

    def put(self, link: str, seq: int, msg) -> None:
        with self._cond:
            self._msgs[link][seq] = msg
            self._cond.notify_all()

    def get(self, link: str, timeout: float):
        with self._cond:
            seq = self._next[link]
            if not self._cond.wait_for(lambda: seq in self._msgs[link], timeout=timeout):
                raise ChannelError(f"no message on link {link!r} within {timeout:.0f} s (the peer may have died)")
            self._next[link] = seq + 1
            return self._msgs[link].pop(seq)

    def reset(self, link: str) -> None:
        with self._cond:
            self._msgs.pop(link, None)
            self._next.pop(link, None)


class RayChannel(Channel):
    """One end of a link: sends with ``peer.deliver.remote(link, seq, msg)``."""

    def __init__(self, peer, mailbox: Mailbox, send_link: str, recv_link: str, timeout: float = 300.0):
        super().__init__()
        self.peer, self.mailbox = peer, mailbox
        self.send_link, self.recv_link, self.timeout = send_link, recv_link, timeout
        self._seq = 0

    def _send_raw(self, arr: np.ndarray) -> None:
        self.peer.deliver.remote(self.send_link, self._seq, arr)
        self._seq += 1

    def _recv_raw(self) -> np.ndarray:
        msg = self.mailbox.get(self.recv_link, self.timeout)
        if isinstance(msg, str) and msg == _CLOSED:
            raise ChannelError("the peer closed the channel (it failed or finished early)")
        return msg

    def close(self) -> None:
        self.peer.deliver.remote(self.send_link, self._seq, _CLOSED)
        self._seq += 1


def bytes_to_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def array_to_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
