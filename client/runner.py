"""The client's runner for ``cryptogen.driver.Driver``: runs the client's half of each stage the
driver names over the session's parties (one per worker link), with telemetry of the public
counts (bytes, rounds, randomness made and used)."""
from __future__ import annotations

import time

from cryptogen.telemetry import TRIPLE_KINDS, Telemetry

from .session import ClientSession


class ClientRunner:
    """Runs the client's half of each stage the driver names, with telemetry."""

    def __init__(self, session: ClientSession, parties: dict, telemetry: Telemetry):
        self.session, self.parties, self.telemetry = session, parties, telemetry
        self._seen: dict = {}

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        parties = {w: self.parties[w] for w in workers}
        with self.telemetry.stage(name):
            getattr(self.session, name)(parties, *client)
        for w, party in parties.items():
            self._record(w, party)
        return dict.fromkeys(workers)

    def barrier(self) -> None:
        """The client's stages run synchronously: nothing is outstanding."""

    def reset_cache(self) -> None:
        """The cache is the server's."""

    def step_done(self, decoded_at: int | None) -> None:
        """A remote dealer's sources ask for the next step's items (the server's workers do alike)."""
        for party in self.parties.values():
            done = getattr(party.cr, "step_done", None)
            if done is not None:
                done(decoded_at)

    def settle(self) -> float:
        """Before a step: wait for the items asked after the last one; the seconds waited."""
        t0 = time.perf_counter()
        for party in self.parties.values():  # each link's fetches run in its own thread meanwhile
            if hasattr(party.cr, "settle"):
                party.cr.settle()
        return time.perf_counter() - t0

    def _record(self, w: int, party) -> None:
        phases = party.chan.stats.phases.values()
        now = {"sent": sum(ph.bytes_sent for ph in phases), "recv": sum(ph.bytes_recv for ph in phases),
               "rounds": sum(ph.rounds for ph in phases)}
        cr = party.cr.counters()
        off = cr.get("offline", {})  # the dealer-free provider's own link
        now["sent"] += off.get("bytes_sent", 0)
        now["recv"] += off.get("bytes_recv", 0)
        now["rounds"] += off.get("rounds", 0)
        for kind in TRIPLE_KINDS:
            now[f"p_{kind}"] = cr["produced"].get(kind, 0)
            now[f"c_{kind}"] = cr["consumed"].get(kind, 0)
        last = self._seen.get(w, dict.fromkeys(now, 0))
        d = {k: now[k] - last[k] for k in now}
        self._seen[w] = now
        self.telemetry.traffic(bytes_to_server=d["sent"], bytes_to_client=d["recv"], rounds=d["rounds"])
        for kind in TRIPLE_KINDS:
            self.telemetry.triples(kind, produced=d[f"p_{kind}"], consumed=d[f"c_{kind}"])
