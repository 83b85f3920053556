"""Operation counters for the HE engine (read by the metrics layer).

Each kernel adds what it did to an :class:`HEStats`: ciphertext-plaintext and
ciphertext-ciphertext multiplications, rotations, refreshes, and the ciphertexts and
bytes that crossed between the parties. Counters are plain ints; ``merge``/``+``
combine the stats of several workers or steps.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class HEStats:
    ct_pt_mul: int = 0
    ct_ct_mul: int = 0
    rotations: int = 0
    additions: int = 0
    encryptions: int = 0
    decryptions: int = 0
    refreshes: int = 0
    rerandomizations: int = 0
    cts_server_to_client: int = 0
    cts_client_to_server: int = 0
    bytes_server_to_client: int = 0
    bytes_client_to_server: int = 0

    def merge(self, other: "HEStats") -> "HEStats":
        """Add ``other``'s counters into this one (in place) and return self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __add__(self, other: "HEStats") -> "HEStats":
        return HEStats().merge(self).merge(other)

    def diff(self, before: "HEStats") -> "HEStats":
        """Counters accumulated since the snapshot ``before``."""
        return HEStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def snapshot(self) -> "HEStats":
        return HEStats().merge(self)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def record_to_client(self, nbytes: int, count: int = 1) -> None:
        self.cts_server_to_client += count
        self.bytes_server_to_client += nbytes

    def record_to_server(self, nbytes: int, count: int = 1) -> None:
        self.cts_client_to_server += count
        self.bytes_client_to_server += nbytes
