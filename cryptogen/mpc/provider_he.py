"""Dealer-free correlated randomness between client and server with BFV (``cryptogen.he``).

Constructions (over the field Z_t shared by the HE plaintexts and the 2PC shares; the client
holds the only secret key; every ciphertext the server sends is re-randomised and noise-flooded
by ``ServerEngine.export``: fresh Enc(0) added, c0 flooded from the worst-case noise bound so that a
key's whole transcript is 2^-40-close to one independent of the server's data; the server loads the
client's context with ``PublicContext.from_bytes(.., self.config)``, which reads N, t, the primes and
the security level from the SEAL context and refuses anything but its own >= 128-bit parameters):

VOLE (the HE-based OLE of Gazelle/Cheetah, as in Overdrive "LowGear", Keller–Pastro–Rotaru,
EUROCRYPT 2018): the client encrypts its inputs u_j (all N slots used) and sends them;
for each output the server returns export(sum_j Enc(u_j) * v_j + w) for plaintext slots v_j, w
it chooses; the client decrypts. With the offline link, ciphertexts are pipelined: the client
keeps up to 32 ciphertexts in flight and the server answers each output as soon as its inputs
have arrived. Every message is one ciphertext (~1 MB < 16 MiB).

Triples (one VOLE per N triples):
  1. client draws a_c, b_c; server draws a_s, b_s, m (uniform, os.urandom);
  2. VOLE: client inputs (a_c, b_c), server v = (b_s, a_s), w = -m;
  3. c_c = a_c b_c + dec, c_s = a_s b_s + m.
  Cost: 2 ciphertexts up, 1 down per N triples (N = 16384: ~3.1 MB), 1 round trip.
Matrix triples (m,k,n): the cross terms A_c B_s + A_s B_c as m*k*n VOLE slots, summed over k.
Solved bits, pooled mode (a uniform r in Z_t with additive shares of its L = 42 bits;
Damgård–Fitzi–Kiltz–Nielsen–Toft, TCC 2006, made here without Beaver triples):
  1. client draws bits x (L per candidate), server bits y; r = x XOR y bitwise;
  2. XOR by one OLE product per bit (the "XOR from one OLE" of GMW-style bit conversion,
     cf. Demmler–Schneider–Zohner ABY, NDSS 2015, B2A): r_i = x_i (1 - 2 y_i) + y_i, so the
     VOLE output  x_i (1 - 2 y_i) + y_i - m_i  is the client's share and m_i the server's;
  3. exact rejection of r >= t by private equality tests (PETs; cf. the DGK-style comparison
     by zero tests, Damgård–Geisler–Krøigaard 2007): r > c = t - 1 iff for exactly one
     position j with c_j = 0 the bits above j equal c's and r_j = 1, i.e. the client's
     X_j = sum_{i>=j} 2^(i-j) x_i equals the server's W_j = sum_{i>j} 2^(i-j)(y_i XOR c_i)
     + (1 - y_j) (|X_j - W_j| < 2^41 < t for j >= 1, so equality mod t is exact). The client
     also sends Enc(X_j) (19 values for t = 4398044938241, whose t - 1 has 20 zero bits); the
     server returns export(rho_j (X_j - W_j)) with fresh uniform rho_j, so the client sees 0 if
     case j holds and a uniform element otherwise. j = 0 (|X_0 - W_0| could reach t) is split
     into rho (X_1 - W'_0) + rho' (x_0 - (1 - y_0)): zero iff both parts are (otherwise
     uniform). A spurious zero (probability 20/t per candidate) only discards a candidate,
     independently of r; accepted r are exactly uniform in [0, t).
  4. client sends the keep mask (public decision), both keep the same candidates.
  Who learns what: the server sees fresh ciphertexts and the keep mask; the client sees
  masked shares (uniform) and, per candidate, zero tests that are uniform unless the
  candidate is rejected (then it learns which case; the candidate is dropped).
  Cost per candidate: 61 slots up, 62 down (~7.9 kB at N = 8192 or 16384), 1 round trip
  + the mask; rejects (2^42 - t) / 2^42 = 3.6e-7 of candidates.
Solved bits, inline mode (no offline link; unchanged): 42 XORs by Beaver triples plus
  ``compare.gt_public`` opened (~123 triples and 7 rounds per item) on the party's channel.
Who learns what overall: the server sees only fresh ciphertexts under the client's key
(IND-CPA); the client sees uniform masked values in ciphertexts whose noise is 2^-40-close
to independent of the server's values. The secret key exists only in the client's source;
the server's holds a ``PublicContext`` (``ServerEngine`` refuses client keys).
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from ..field import DEFAULT_T, add, matmul, mul, neg, random_elements, sub
from .errors import ProviderError, RoleError
from .pool import PooledSource, Stopped, recv_blob, send_blob
from .provider import Source, nbits


def _to_arr(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8)


class HEProvider:
    """Dealer-free provider: ``source(role, channel, party)`` returns that role's end.

    ``offline``: None (inline: produced on demand on the party's channel), this side's end of
    a dedicated offline link (a ``Channel``; deployment), or a (client_end, server_end) pair
    (one provider object shared by both roles in one process). With a link, a background
    producer fills pools ahead of demand (``cryptogen.mpc.pool``); ``lookahead``, ``per_token``
    and further ``pool_options`` (``max_pool_bytes``, ``stall_timeout``, ``ping_every``) set
    its policy.
    """

    name = "he"

    def __init__(self, config=None, offline=None, lookahead: float = 2, per_token: dict | None = None,
                 **pool_options):
        from ..he import HEConfig
        self.config = config or HEConfig()
        if self.config.t != DEFAULT_T:
            raise ProviderError("HE plaintext modulus must equal the 2PC field modulus")
        self.offline = offline
        self.tag = "he" if offline is None else "he+offline-pool"
        self.pool_options = dict(pool_options, lookahead=lookahead, per_token=per_token)
        self.sources: dict = {}

    def _link(self, role):
        if isinstance(self.offline, (tuple, list)):
            if len(self.offline) != 2:
                raise ProviderError("offline must be a channel or a (client_end, server_end) pair")
            return self.offline[0 if role == "client" else 1]
        return self.offline

    def source(self, role, channel, party=None):
        if role not in ("client", "server"):
            raise RoleError(f"unknown role {role!r}")
        if self.offline is not None:
            if party is not None and party.t != self.config.t:
                raise ProviderError("HE provider and party use different field moduli")
            maker = (ClientMaker if role == "client" else ServerMaker)(self.config)
            src = PooledSource(role, self.config.t, self._link(role), maker, **self.pool_options)
        else:
            if channel is None or party is None:
                raise ProviderError("the HE provider needs the party's channel")
            src = (HEClientSource if role == "client" else HEServerSource)(self.config, channel, party)
        self.sources[role] = src
        return src

    def close(self) -> None:
        """Stop every pooled source this provider made (in-process use)."""
        for src in self.sources.values():
            close = getattr(src, "close", None)
            if close:
                close()


# ------------------------------------------------------------------------------------------
def bits_layout(t: int, L: int):
    """Public layout of the solved-bits VOLE: (zero positions of t-1, positions j whose X_j
    the client sends). Inputs: x_0..x_{L-1}, then X_j for j in the second list."""
    c = t - 1
    zeros = [j for j in range(L) if not (c >> j) & 1]
    sent = sorted({j for j in zeros if j >= 1} | ({1} if 0 in zeros else set()))
    return zeros, sent


def _suffix_values(bits: np.ndarray, j: int) -> np.ndarray:
    """sum_{i>=j} 2^(i-j) bits[:, i] (< 2^(L-j))."""
    w = np.int64(1) << np.arange(bits.shape[1] - j, dtype=np.int64)
    return (bits[:, j:] * w).sum(1)


class _Maker:
    """One party's half of the pooled HE protocols over a channel."""

    window = 32  # ciphertexts in flight from the client

    def __init__(self, config):
        self.config, self.t, self.N, self.L = config, config.t, config.n, nbits(config.t)

    def rand_bits(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        return (np.frombuffer(os.urandom(n), np.uint8) & 1).astype(np.int64).reshape(shape)

    def make(self, chan, kind, count, key=None, stop=None):
        if kind == "triple":
            return self.triples(chan, count, stop)
        if kind == "matrix":
            return self.matrix(chan, count, *key, stop=stop)
        if kind == "bits":
            return self.bits(chan, count, stop)
        raise ProviderError(f"unknown kind {kind!r}")

    def _finish_bits(self, shares, keep):
        bits = np.stack(shares, 1)[keep]
        r = np.mod(mul(bits, np.int64(1) << np.arange(self.L, dtype=np.int64), self.t).sum(-1), self.t)
        return bits, r


class ClientMaker(_Maker):
    def setup(self, chan):
        from ..he import ClientKeys
        self.keys = ClientKeys.generate(self.config)
        send_blob(chan, self.keys.public_context_bytes())

    def vole(self, chan, us, n_out, stop=None):
        """Client: decrypted outputs (n_out arrays of len(us[0])) of the server's linear forms."""
        n, N, keys = len(us[0]), self.N, self.keys
        chunks = -(-n // N)
        outs = [np.empty(n, np.int64) for _ in range(n_out)]
        ahead, sent = max(1, self.window // len(us)), 0
        for ci in range(chunks):
            while sent < min(chunks, ci + ahead):
                lo, hi = sent * N, min(n, sent * N + N)
                for u in us:
                    slots = np.zeros(N, np.int64)
                    slots[:hi - lo] = u[lo:hi]
                    chan.send(_to_arr(keys.encrypt_to_bytes(slots)))
                sent += 1
            if stop is not None and stop():
                raise Stopped()
            lo, hi = ci * N, min(n, ci * N + N)
            for o in outs:
                o[lo:hi] = keys.decrypt_bytes(chan.recv(dtype=np.uint8).tobytes())[:hi - lo]
        return outs

    def triples(self, chan, count, stop=None):
        a, b = random_elements(count, self.t), random_elements(count, self.t)
        (cross,) = self.vole(chan, [a, b], 1, stop)
        return a, b, add(mul(a, b, self.t), cross, self.t)

    def matrix(self, chan, count, m, k, n, stop=None):
        A, B = random_elements((count, m, k), self.t), random_elements((count, k, n), self.t)
        u1 = np.broadcast_to(A[..., None], (count, m, k, n)).ravel()
        u2 = np.broadcast_to(B[:, None], (count, m, k, n)).ravel()
        (cross,) = self.vole(chan, [u1, u2], 1, stop)
        cross = np.mod(cross.reshape(count, m, k, n).sum(2), self.t)  # k < 2^21 terms < 2^42
        C = np.stack([matmul(A[i], B[i], self.t) for i in range(count)])
        return A, B, add(C, cross, self.t)

    def bits(self, chan, count, stop=None):
        zeros, sent = bits_layout(self.t, self.L)
        x = self.rand_bits((count, self.L))
        us = [x[:, i] for i in range(self.L)] + [_suffix_values(x, j) for j in sent]
        outs = self.vole(chan, us, self.L + len(zeros), stop)
        keep = np.all(np.stack(outs[self.L:]) != 0, axis=0)
        chan.send(keep.astype(np.uint8))
        return self._finish_bits(outs[:self.L], keep)


class ServerMaker(_Maker):
    def setup(self, chan):
        from ..he import PublicContext, ServerEngine
        self.engine = ServerEngine(PublicContext.from_bytes(recv_blob(chan, 64 << 20), self.config))

    def vole(self, chan, n_in, n, outputs):
        """Server: per chunk of N slots, ``outputs(lo, hi)`` lists (terms [(input, coefficient
        slots)], additive slots) in the order sent; each is answered once its inputs are in."""
        eng, N = self.engine, self.N

        def pad(v):
            s = np.zeros(N, np.int64)
            s[:len(v)] = v
            return s
        for lo in range(0, n, N):
            hi, cts = min(n, lo + N), []
            for terms, extra in outputs(lo, hi):
                while len(cts) <= max(j for j, _ in terms):
                    cts.append(eng.receive(chan.recv(dtype=np.uint8).tobytes()))
                acc = None
                for j, coef in terms:
                    term = eng.mul_ct_pt(cts[j], eng.encode(pad(coef)))
                    acc = term if acc is None else eng.add_ct_ct(acc, term)
                chan.send(_to_arr(eng.export(eng.add_ct_pt(acc, pad(extra)), "correlated randomness")))
            while len(cts) < n_in:  # inputs no output used (none in these protocols)
                cts.append(eng.receive(chan.recv(dtype=np.uint8).tobytes()))

    def triples(self, chan, count, stop=None):
        t = self.t
        a, b, m = (random_elements(count, t) for _ in range(3))
        self.vole(chan, 2, count, lambda lo, hi: [([(0, b[lo:hi]), (1, a[lo:hi])], neg(m[lo:hi], t))])
        return a, b, add(mul(a, b, t), m, t)

    def matrix(self, chan, count, m, k, n, stop=None):
        t = self.t
        A, B = random_elements((count, m, k), t), random_elements((count, k, n), t)
        v1 = np.broadcast_to(B[:, None], (count, m, k, n)).ravel()
        v2 = np.broadcast_to(A[..., None], (count, m, k, n)).ravel()
        M = random_elements(count * m * k * n, t)
        self.vole(chan, 2, len(M), lambda lo, hi: [([(0, v1[lo:hi]), (1, v2[lo:hi])], neg(M[lo:hi], t))])
        cross = np.mod(M.reshape(count, m, k, n).sum(2), t)
        C = np.stack([matmul(A[i], B[i], t) for i in range(count)])
        return A, B, add(C, cross, t)

    def bits(self, chan, count, stop=None):
        t, L = self.t, self.L
        zeros, sent = bits_layout(t, L)
        c = ((t - 1) >> np.arange(L)) & 1
        y = self.rand_bits((count, L))
        masks = random_elements((L, count), t)
        flip = 1 - 2 * y  # x (1 - 2y) + y = x XOR y
        yc = y ^ c  # bits the client's must equal above a case position
        W = {}
        for j in zeros:  # the server's side of each zero test (see the module doc)
            if j == 0:
                W[0] = (_suffix_values(yc, 1), 1 - y[:, 0])
            else:
                W[j] = (np.mod(_suffix_values(yc, j + 1) * 2 + 1 - y[:, j], t),)
        rho = random_elements((len(zeros), 2, count), t)

        def outputs(lo, hi):
            out = [([(i, np.mod(flip[lo:hi, i], t))], sub(y[lo:hi, i], masks[i, lo:hi], t)) for i in range(L)]
            for z, j in enumerate(zeros):
                r1 = rho[z, 0, lo:hi]
                if j == 0:
                    r2, (hi_part, bit0) = rho[z, 1, lo:hi], W[0]
                    extra = add(mul(r1, hi_part[lo:hi], t), mul(r2, bit0[lo:hi], t), t)
                    out.append(([(L + sent.index(1), r1), (0, r2)], neg(extra, t)))
                else:
                    out.append(([(L + sent.index(j), r1)], neg(mul(r1, W[j][0][lo:hi], t), t)))
            return out
        self.vole(chan, L + len(sent), count, outputs)
        keep = chan.recv(shape=(count,), dtype=np.uint8).astype(bool)
        return self._finish_bits(list(masks), keep)


# ------------------------------------------------------------------------------------------
# Inline mode (no offline link): produced on demand on the party's channel, phase "offline".
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
                self.chan.send(_to_arr(self.keys.encrypt_to_bytes(c)))
            reply = self.chan.recv().tobytes()
            out.append(self.keys.decrypt_bytes(reply)[: len(u1[s:s + N])])
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
