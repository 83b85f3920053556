"""Ciphertext <-> additive shares over Z_t (CryptoGen 2026 §2; the H2S/S2H of Cheetah/BOLT).

Because HE plaintexts and 2PC shares live in the same field Z_t, each conversion is one
masked addition (no ring conversion).

H2S (server holds Enc(x); afterwards server holds r, client holds x - r):
  1. server draws r uniform in Z_t^n (``cryptogen.field.random_elements``, os.urandom);
  2. server computes Enc(x - r), re-randomises and floods it (``ServerEngine.export``);
  3. client decrypts x - r. The client sees x - r, uniform and independent of x (perfect
     hiding by r), inside a ciphertext whose noise is 2^-sigma-close to independent of the
     server's data. The server sees nothing new.
S2H (client holds share x_c, server x_s; afterwards server holds Enc(x_c + x_s)):
  1. client encrypts x_c (fresh symmetric encryption, sent in the seeded form of ``wire``);
  2. server adds its plaintext share x_s. The server sees only a ciphertext.
Refresh = H2S + fresh S2H through the client: the client decrypts x - r and re-encrypts it;
the server adds r. Cost: one ciphertext each way, one decryption and one encryption.
Slot layouts: both parties apply the same public layout function to their own share
(layouts only copy/zero entries, so they commute with additive sharing).
"""
from __future__ import annotations

import numpy as np

from cryptogen.field import add as f_add
from cryptogen.field import random_elements

from .engine import Cipher, ServerEngine
from .errors import SecretKeyError
from .keys import ClientKeys, PublicContext
from .stats import HEStats


# ---------------- server side -------------------------------------------------
def h2s_server(engine: ServerEngine, c: Cipher, what: str = "ciphertext") -> tuple[bytes, np.ndarray]:
    """Server step of H2S: returns (bytes for the client, the server's share r)."""
    r = random_elements(engine.config.n, engine.config.t)
    masked = engine.sub_ct_pt(c, r)
    return engine.export(masked, what), r


def s2h_server(engine: ServerEngine, client_bytes: bytes, server_share_slots) -> Cipher:
    """Server step of S2H: Enc(x_c) from the client plus the server's plaintext share."""
    return engine.add_ct_pt(engine.receive(client_bytes), server_share_slots)


def refresh(engine: ServerEngine, c: Cipher, client: "ClientRole") -> Cipher:
    """Fresh ciphertext of the same slots via the client (H2S, client re-encrypts, S2H)."""
    data, r = h2s_server(engine, c, "refresh")
    fresh = s2h_server(engine, client.refresh(data), r)
    engine.stats.refreshes += 1
    return fresh


# ---------------- client side -------------------------------------------------
class ClientRole:
    """The client's half of H2S/S2H/refresh; holds the secret key. Not for server code."""

    def __init__(self, keys: ClientKeys, stats: HEStats | None = None):
        if isinstance(keys, PublicContext) or not isinstance(keys, ClientKeys):
            raise SecretKeyError("ClientRole needs the client's key set")
        self.keys = keys
        self.stats = stats if stats is not None else HEStats()

    def s2h_send(self, share_slots) -> bytes:
        """Encrypt the client's share (already in its slot layout) for the server."""
        self.stats.encryptions += 1
        return self.keys.encrypt_to_bytes(share_slots)

    def h2s_receive(self, data: bytes) -> np.ndarray:
        """Decrypt Enc(x - r): the client's share of every slot."""
        self.stats.decryptions += 1
        return self.keys.decrypt_bytes(data)

    def refresh(self, data: bytes) -> bytes:
        return self.s2h_send(self.h2s_receive(data))

    def measured_budget(self, data: bytes) -> int:
        return self.keys.noise_budget(self.keys.ct_from_bytes(data))


def reconstruct(client_share: np.ndarray, server_share: np.ndarray, t: int) -> np.ndarray:
    """Test/reference helper: x = x_c + x_s mod t."""
    return f_add(client_share, server_share, t)
