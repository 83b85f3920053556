"""A party of the 2PC engine: its role, its channel, its correlated randomness, fixed point.

Every protocol is one function ``proto(party, *shares, **public)`` that BOTH parties call
with their own ``Party`` and their own shares, in the same order; the code branches on
``party.is_client`` only where the two roles differ (e.g. the client adds public
constants). Shares are ``np.int64`` arrays in ``[0, t)`` (see ``cryptogen.field``).

Running a role outside this process (e.g. the user's client and a server worker, over TLS)::

    chan = MyRayChannel(...)                       # implements Channel._send_raw/_recv_raw
    me = Party("server", chan, provider)           # provider.source("server", ...) inside
    with abort_on_error(chan):                     # if this side raises, the peer fails at once
        me.handshake()                             # checks roles and provider agree
        y_share = softmax(me, x_share, causal=True)

``simulate`` does exactly this for both roles in two threads of one process.
"""
from __future__ import annotations

import threading
import zlib

import numpy as np

from ..field import DEFAULT_FRAC_BITS, DEFAULT_T, FixedPoint, random_elements
from .channel import Channel, abort_on_error, channel_pair
from .errors import ChannelError, FieldValueError, ProviderError, RangeError, RoleError

ROLES = ("client", "server")


class Party:
    """One party's state. ``provider`` is a provider object (``DealerProvider``, ``HEProvider``)."""

    def __init__(self, role: str, channel: Channel, provider, fp: FixedPoint | None = None):
        if role not in ROLES:
            raise RoleError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.chan = channel
        self.fp = fp or FixedPoint(DEFAULT_T, DEFAULT_FRAC_BITS)
        if not 10 <= self.fp.frac_bits <= 14:
            raise RangeError("the 2PC protocols support interface frac_bits in [10, 14]")
        self.t = self.fp.t
        self.provider_name = provider.name
        self.provider_tag = getattr(provider, "tag", provider.name)
        self.cr = provider.source(role, channel, self)

    @property
    def is_client(self) -> bool:
        return self.role == "client"

    def handshake(self) -> None:
        """Exchange (role, provider, t, f); raise if the two parties disagree."""
        tag = zlib.crc32(self.provider_tag.encode())
        mine = np.array([ROLES.index(self.role), tag, self.t, self.fp.frac_bits], np.int64)
        with self.chan.phase("setup"):
            self.chan.send(mine)
            other = self.chan.recv(shape=(4,), dtype=np.int64)
        if other[0] == mine[0]:
            raise RoleError(f"both parties claim the role {self.role!r}")
        if other[1] != mine[1]:
            raise ProviderError(f"the peer uses a different correlated-randomness provider or "
                                f"dealer session (this party: {self.provider_name!r})")
        if other[2] != mine[2] or other[3] != mine[3]:
            raise ProviderError("the peer uses a different field modulus or fixed-point scale")

    def check(self, *arrays) -> None:
        """Raise unless every array is an int64 array of field elements."""
        for a in arrays:
            if not isinstance(a, np.ndarray) or a.dtype != np.int64:
                raise FieldValueError("shares must be np.int64 arrays")
            if a.size and (a.min() < 0 or a.max() >= self.t):
                raise FieldValueError("shares must lie in [0, t)")


def share(x: np.ndarray, t: int = DEFAULT_T, rng=None):
    """Split field elements x into uniformly random additive shares (client, server)."""
    x = np.asarray(x, np.int64)
    r = random_elements(x.shape, t, rng)
    return np.mod(x - r, t), r


def reconstruct(c: np.ndarray, s: np.ndarray, t: int = DEFAULT_T) -> np.ndarray:
    return np.mod(np.asarray(c, np.int64) + np.asarray(s, np.int64), t)


def _run(role, chan, provider, fp, fn, inputs, out, errs):
    try:
        with abort_on_error(chan):  # a failure here makes the peer's receive fail at once
            p = Party(role, chan, provider, fp)
            p.handshake()
            out[role] = (fn(p, *inputs), p)
    except BaseException as e:  # noqa: BLE001 - re-raised by simulate
        errs[role] = e


def simulate(fn, client_inputs=(), server_inputs=(), provider=None, fp=None, stats=None,
             record=False, timeout=120.0):
    """Run ``fn(party, *inputs)`` as client and as server in two threads; return both outputs.

    ``provider`` defaults to a fresh ``DealerProvider``. If ``stats`` is a dict it receives
    each party's channel counters, transcript (if ``record``), provider counters and name.
    """
    from .provider import DealerProvider
    provider = provider or DealerProvider()
    cc, sc = channel_pair(timeout=timeout, record=record)
    out, errs = {}, {}
    ths = [threading.Thread(target=_run, args=(r, ch, provider, fp, fn, tuple(inp), out, errs))
           for r, ch, inp in (("client", cc, client_inputs), ("server", sc, server_inputs))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errs:
        first = [e for e in errs.values() if not isinstance(e, ChannelError)]
        raise (first or list(errs.values()))[0]
    if stats is not None:
        for role, ch in (("client", cc), ("server", sc)):
            p = out[role][1]
            stats[role] = dict(channel=ch.stats.as_dict(), transcript=ch.transcript, opened=ch.opened,
                               randomness=p.cr.counters())
        stats["provider"] = provider.name
    return out["client"][0], out["server"][0]
