"""The dealer as a Ray actor: a third, non-colluding party that only makes correlated
randomness (the CrypTen TTP / SIGMA model) and never sees an input.

Both parties' sources ask the dealer for the same sequence of batches (their refill
decisions depend only on public sizes). The first request of batch ``seq`` on a link makes
both bundles and keeps the other party's until that party asks; each party receives only
its own bundle.
"""
from __future__ import annotations

import os
import threading

import ray

from cryptogen.mpc.errors import ProviderError
from cryptogen.mpc.provider import _FIELDS, Dealer, Source


@ray.remote(num_cpus=0, max_concurrency=16)
class DealerActor:
    def __init__(self, t: int):
        self.dealer = Dealer(t)
        self.pending: dict = {}
        self.made = 0
        self._lock = threading.Lock()  # both parties of a link ask concurrently

    def bundle(self, link: str, role: str, seq: int, kind: str, count: int, key=None):
        with self._lock:
            return self._bundle(link, role, seq, kind, count, key)

    def _bundle(self, link, role, seq, kind, count, key):
        slot = (link, seq)
        if slot in self.pending:
            want, other_role, bundle = self.pending.pop(slot)
            if want != (kind, count, key) or other_role == role:
                raise ProviderError(f"link {link!r}: the parties asked for different correlated randomness")
            return bundle
        pair = self.dealer.make(kind, count, key)
        self.made += count
        mine, theirs = (pair[0], pair[1]) if role == "client" else (pair[1], pair[0])
        self.pending[slot] = ((kind, count, key), role, theirs)
        return mine

    def forget(self, link_prefix: str) -> None:
        with self._lock:
            self.pending = {k: v for k, v in self.pending.items() if not k[0].startswith(link_prefix)}


class RayDealerSource(Source):
    name = "dealer"

    def __init__(self, role: str, t: int, dealer, link: str):
        super().__init__(role, t)
        self.dealer, self.link, self.seq = dealer, link, 0

    def _refill(self, kind, count, key=None):
        bundle = ray.get(self.dealer.bundle.remote(self.link, self.role, self.seq, kind, count, key))
        self.seq += 1
        self._push(kind, tuple(bundle[f] for f in _FIELDS[kind]), key)


class RayDealerProvider:
    """Picklable provider handed to both ends of one link."""

    name = "dealer"

    def __init__(self, dealer, link: str, t: int):
        self.dealer, self.link, self.t = dealer, link, t
        self.tag = f"dealer:{os.urandom(8).hex()}"  # the handshake checks both ends got this provider

    def source(self, role, channel=None, party=None) -> RayDealerSource:
        return RayDealerSource(role, self.t, self.dealer, self.link)
