"""Dealer-free correlated randomness between client and server with BFV (``cryptogen.he``).

Construction: the HE-based Beaver-triple generation of SPDZ/Overdrive-style "LowGear" in its
two-party form (Keller–Pastro–Rotaru, EUROCRYPT 2018; also Gazelle/Cheetah's OLE), over the
field Z_t shared by the HE plaintexts and the 2PC shares, with circuit privacy by
re-randomisation and noise flooding (``cryptogen.he.engine.ServerEngine.export``).

Triples (one batch = N = 8192 triples; all slots used):
  1. client draws a_c, b_c; server draws a_s, b_s (uniform in Z_t, os.urandom);
  2. client -> server: Enc(a_c), Enc(b_c)   (fresh public-key encryptions, 2 ciphertexts);
  3. server: X = Enc(a_c) * b_s + Enc(b_c) * a_s - r (2 ct x pt), r uniform; export(X):
     add a fresh Enc(0) and flood c0 with 2^-40-statistically hiding noise; server -> client;
  4. client decrypts the cross term share; c_c = a_c b_c + dec, c_s = a_s b_s + r.
  Who learns what: the server sees only fresh ciphertexts under the client's key (IND-CPA);
  the client sees a uniform value (masked by r) in a ciphertext whose noise is 2^-40-close to
  independent of a_s, b_s. Cost: 1 round trip, 3 ciphertexts (~1.57 MB) per 8192 triples.
Matrix triples (m,k,n): the cross terms A_c B_s + A_s B_c are m*k*n elementwise cross products
  (the same OLE batch, broadcast), summed over k locally: ceil(mkn / 8192) batches.
Solved bits (uniform r in Z_t with shared bits):
  1. per bit, client and server each draw a private bit; r_i = b_c XOR b_s = b_c + b_s - 2 b_c b_s
     (one Beaver product with client-input and server-input shares);
  2. reject r >= t: [r > t-1] by ``compare.gt_public`` and opened (the opened bit only says
     whether this random r is discarded: independent of any input); expected rejections
     (1 - t/2^42) = 3.6e-4 per item.
  Cost: 42 + ~82 triples and 7 rounds per item, all offline.
The secret key exists only in the client's source; the server's source holds a
``PublicContext`` (``ServerEngine`` refuses client keys).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..field import DEFAULT_T, add, mul, random_elements, sub
from .errors import ProviderError, RoleError
from .provider import Source

_OLE = 2  # two products per OLE slot: u1*v1 + u2*v2


def _to_arr(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


class HEProvider:
    """Dealer-free provider: ``source(role, channel, party)`` returns that role's end."""

    name = "he"

    def __init__(self, config=None):
        from ..he import HEConfig
        self.config = config or HEConfig()
        if self.config.t != DEFAULT_T:
            raise ProviderError("HE plaintext modulus must equal the 2PC field modulus")

    def source(self, role, channel, party=None):
        if channel is None or party is None:
            raise ProviderError("the HE provider needs the party's channel")
        if role == "client":
            return HEClientSource(self.config, channel, party)
        if role == "server":
            return HEServerSource(self.config, channel, party)
        raise RoleError(f"unknown role {role!r}")


class _HESource(Source):
    name = "he"

    def __init__(self, config, channel, party):
        super().__init__(party.role, config.t)
        self.config, self.chan, self.party = config, channel, party
        self.min_batch = {"triple": config.n, "bits": 256, "matrix": 1}
        self._ready = False
        self.consumed_offline: Counter = Counter()

    def counters(self) -> dict:
        return dict(super().counters(), consumed_offline=dict(self.consumed_offline))

    def _refill(self, kind, count, key=None):
        before = Counter(self.consumed)
        try:
            self._refill_offline(kind, count, key)
        finally:  # triples used to make solved bits are offline work, not online consumption
            used = self.consumed - before
            self.consumed -= used
            self.consumed_offline += used

    def _refill_offline(self, kind, count, key):
        with self.chan.phase("offline"):
            if not self._ready:
                self._setup()
                self._ready = True
            if kind == "triple":
                self._push("triple", self._make_triples(count))
            elif kind == "matrix":
                self._push("matrix", self._make_matrix(count, *key), key)
            elif kind == "bits":
                self._push("bits", self._make_bits(count))
            else:
                raise ProviderError(f"unknown kind {kind!r}")

    # -- triples ---------------------------------------------------------------------------
    def _make_triples(self, count):
        a, b = random_elements(count, self.t), random_elements(count, self.t)
        cross = self._ole(b, a) if self.role == "server" else self._ole(a, b)
        c = add(mul(a, b, self.t), cross, self.t)
        return a, b, c

    def _make_matrix(self, count, m, k, n):
        A = random_elements((count, m, k), self.t)
        B = random_elements((count, k, n), self.t)
        if self.role == "client":  # u1 = A_c (x) 1, u2 = B_c (x) 1 ; server v1 = B_s, v2 = A_s
            u1 = np.broadcast_to(A[..., None], (count, m, k, n))
            u2 = np.broadcast_to(B[:, None], (count, m, k, n))
        else:
            u1 = np.broadcast_to(B[:, None], (count, m, k, n))
            u2 = np.broadcast_to(A[..., None], (count, m, k, n))
        cross = self._ole(u1.ravel(), u2.ravel()).reshape(count, m, k, n)
        cross = np.mod(cross.sum(2), self.t)  # k < 2^21 terms below 2^42: no overflow
        C = np.stack([self._local_mm(A[i], B[i]) for i in range(count)])
        return A, B, add(C, cross, self.t)

    def _local_mm(self, A, B):
        from ..field import matmul
        return matmul(A, B, self.t)

    # -- solved bits -----------------------------------------------------------------------
    def _make_bits(self, count):
        from .arith import input_client, input_server, mul_ss, open_
        from .compare import gt_public
        p, L, got = self.party, self.L, []
        need = count
        while need > 0:
            m = need + need // 500 + 8
            mine = (np.frombuffer(__import__("os").urandom(m * L), np.uint8) & 1).astype(np.int64)
            mine = mine.reshape(m, L)
            bc = input_client(p, mine if p.is_client else None, shape=(m, L))
            bs = input_server(p, None if p.is_client else mine, shape=(m, L))
            prod = mul_ss(p, bc, bs)
            bits = sub(add(bc, bs, self.t), mul(prod, np.int64(2), self.t), self.t)
            reject = open_(p, gt_public(p, bits, np.full(m, self.t - 1, np.int64)))
            keep = bits[reject == 0][:need]
            got.append(keep)
            need -= len(keep)
        bits = np.concatenate(got)
        r = np.mod(mul(bits, np.int64(1) << np.arange(L, dtype=np.int64), self.t).sum(-1), self.t)
        return bits, r


class HEClientSource(_HESource):
    """Client end: holds the secret key; encrypts its halves, decrypts the masked cross terms."""

    def _setup(self):
        from ..he import ClientKeys
        self.keys = ClientKeys.generate(self.config)
        self.chan.send(_to_arr(self.keys.public_context_bytes()))

    def _ole(self, u1, u2):
        """Shares of u1*v1 + u2*v2 where the server holds v1, v2 (client's share returned)."""
        N, out = self.config.n, []
        for s in range(0, len(u1), N):
            chunk = [np.zeros(N, np.int64) for _ in range(2)]
            for c, u in zip(chunk, (u1, u2)):
                c[: len(u[s:s + N])] = u[s:s + N]
            for c in chunk:
                self.chan.send(_to_arr(self.keys.ct_to_bytes(self.keys.encrypt(c))))
            reply = self.chan.recv().tobytes()
            out.append(self.keys.decrypt(self.keys.ct_from_bytes(reply))[: len(u1[s:s + N])])
        return np.concatenate(out) if out else np.zeros(0, np.int64)


class HEServerSource(_HESource):
    """Server end: PublicContext only (no secret key); ct x pt, mask, re-randomise, flood."""

    def _setup(self):
        from ..he import PublicContext, ServerEngine
        ctx = PublicContext.from_bytes(self.chan.recv().tobytes(), self.config)
        self.engine = ServerEngine(ctx)

    def _ole(self, v1, v2):
        N, eng, out = self.config.n, self.engine, []
        for s in range(0, len(v1), N):
            n = len(v1[s:s + N])
            cts = [eng.receive(self.chan.recv().tobytes()) for _ in range(2)]
            terms = []
            for ct, v in zip(cts, (v1, v2)):
                slots = np.zeros(N, np.int64)
                slots[:n] = v[s:s + N]
                terms.append(eng.mul_ct_pt(ct, eng.encode(slots)))
            r = random_elements(N, self.t)
            self.chan.send(_to_arr(eng.export(eng.sub_ct_pt(eng.add_ct_ct(*terms), r), "triples")))
            out.append(r[:n])
        return np.concatenate(out) if out else np.zeros(0, np.int64)
