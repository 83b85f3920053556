"""Server-side ciphertext evaluator with op counting and static noise tracking.

Construction: SEAL BFV evaluation (Pyfhel); circuit privacy by re-randomisation and
noise flooding before a ciphertext leaves the server (Gentry's flooding; as used by
Gazelle/Cheetah-style 2PC+HE), see :meth:`ServerEngine.export`.

Steps of ``export`` (server -> client):
  1. check the static budget b leaves room for flooding (else NoiseBudgetError);
  2. add a fresh public-key encryption of zero (c1 becomes freshly random);
  3. add to c0 a polynomial e_f with coefficients uniform in [-B, B), B = 2^(sigma + log2 n) * E,
     where E = q / (2 t 2^b) bounds the evaluation noise. Then each coefficient of the
     noise differs in distribution from a simulated one by <= E / B, and the whole
     ciphertext by <= n E / B = 2^-sigma (sigma = 40 by default): its noise carries no
     statistically useful information about the server's weights or shares.
Who learns what: the client later decrypts Enc(x - r) only (see convert.py).
Cost: per export one encryption of zero (~2 ms) and one pass over c0's RNS words.
Every method is callable with a :class:`PublicContext` only.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from Pyfhel import PyCtxt

from .errors import SecretKeyError, SerializationError, ShapeError
from .keys import ClientKeys, PublicContext
from .noise import NoiseModel
from .stats import HEStats


@dataclass
class Cipher:
    """A server-held ciphertext and its static noise-budget estimate (bits)."""

    ct: PyCtxt
    budget: float


def _mulmod_scalar(a: np.ndarray, c: int, q: int) -> np.ndarray:
    """a * c mod q for uint64 a < q < 2^47 and a Python int c, without overflow."""
    c %= q
    r = np.zeros_like(a)
    for shift in range((q.bit_length() + 15) // 16 - 1, -1, -1):
        chunk = (c >> (16 * shift)) & 0xFFFF
        r = np.mod(np.mod(r << np.uint64(16), np.uint64(q)) + np.mod(a * np.uint64(chunk), np.uint64(q)), np.uint64(q))
    return r


def _uniform_mod(bits: int, shape, moduli: list[int]) -> np.ndarray:
    """Residues mod each q_i of integers uniform in [-2^bits, 2^bits) (os.urandom)."""
    total = bits + 1
    nlimb = (total + 59) // 60
    n = int(np.prod(shape))
    limbs = np.frombuffer(os.urandom(8 * n * nlimb), dtype=np.uint64).reshape(nlimb, n).copy()
    limbs &= np.uint64((1 << 60) - 1)
    top = total - 60 * (nlimb - 1)
    limbs[-1] &= np.uint64((1 << top) - 1)
    out = np.empty((len(moduli), n), dtype=np.uint64)
    for i, q in enumerate(moduli):
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(nlimb):
            acc = np.mod(acc + _mulmod_scalar(np.mod(limbs[j], np.uint64(q)), 1 << (60 * j), q), np.uint64(q))
        off = (1 << bits) % q  # subtract 2^bits to center
        out[i] = np.mod(acc + np.uint64(q - off), np.uint64(q))
    return out


class ServerEngine:
    """Evaluates on ciphertexts for the server; accepts only a :class:`PublicContext`."""

    def __init__(self, ctx: PublicContext, stats: HEStats | None = None):
        if isinstance(ctx, ClientKeys) or not isinstance(ctx, PublicContext):
            raise SecretKeyError("server-side code must be built from a PublicContext, not client keys")
        ctx.assert_public()
        self.ctx, self.config = ctx, ctx.config
        self.stats = stats if stats is not None else HEStats()
        self.noise = NoiseModel(ctx.config)
        self._qi = list(ctx.qi)

    # ---- encoding / transport -------------------------------------------------
    def encode(self, slots):
        return self.ctx.encode(slots)

    def encrypt(self, slots) -> Cipher:
        """Server-side public-key encryption (e.g. of its own share)."""
        self.stats.encryptions += 1
        return Cipher(self.ctx.encrypt_public(slots), self.noise.fresh)

    def receive(self, data: bytes) -> Cipher:
        """A fresh ciphertext sent by the client (S2H input, refresh)."""
        ct = self.ctx.ct_from_bytes(data)
        if ct.size() != 2:
            raise ShapeError("client ciphertexts must have 2 polynomials")
        self.stats.record_to_server(len(data))
        return Cipher(ct, self.noise.fresh)

    def export(self, c: Cipher, what: str = "ciphertext") -> bytes:
        """Re-randomise + flood ``c`` (see module doc) and serialize it for the client."""
        self.noise.require_sendable(c.budget, what)
        ct = c.ct
        if ct.size() != 2:
            ct = self.ctx.he.relinearize(ct) or ct
        ct = ct + self.ctx.encrypt_public(np.zeros(self.config.n, np.int64))
        ct = self._flood(ct, c.budget)
        self.stats.rerandomizations += 1
        data = self.ctx.ct_to_bytes(ct)
        self.stats.record_to_client(len(data))
        return data

    def flood_bits(self, budget: float) -> int:
        lq = self.config.data_modulus_bits
        noise_bits = lq - math.log2(self.config.t) - budget - 1  # log2 of the noise bound E
        return int(math.ceil(self.config.flood_sigma + math.log2(self.config.n) + noise_bits))

    def _flood(self, ct: PyCtxt, budget: float) -> PyCtxt:
        raw = ct.to_bytes("none")
        n = self.config.n
        (size, degree, k) = struct.unpack_from("<QQQ", raw, 16 + 32 + 1)
        if degree != n or size != 2 or k > len(self._qi):
            raise SerializationError("unexpected SEAL ciphertext layout")
        data_len = size * k * n * 8
        data = np.frombuffer(raw[-data_len:], dtype=np.uint64).reshape(size, k, n).copy()
        noise = _uniform_mod(self.flood_bits(budget), (n,), self._qi[:k])
        for i in range(k):
            q = np.uint64(self._qi[i])
            data[0, i] = np.mod(data[0, i] + noise[i], q)
        return PyCtxt(pyfhel=self.ctx.he, bytestring=raw[:-data_len] + data.tobytes())

    # ---- arithmetic -----------------------------------------------------------
    def mul_ct_pt(self, c: Cipher, pt) -> Cipher:
        self.stats.ct_pt_mul += 1
        return Cipher(self.ctx.he.multiply_plain(c.ct, pt, True), self.noise.after_ct_pt(c.budget))

    def mul_ct_ct(self, a: Cipher, b: Cipher) -> Cipher:
        self.stats.ct_ct_mul += 1
        ct = self.ctx.he.multiply(a.ct, b.ct, True)
        self.ctx.he.relinearize(ct)
        return Cipher(ct, self.noise.after_ct_ct(a.budget, b.budget))

    def add_ct_ct(self, a: Cipher, b: Cipher) -> Cipher:
        self.stats.additions += 1
        return Cipher(a.ct + b.ct, self.noise.add(a.budget, b.budget))

    def add_ct_pt(self, c: Cipher, slots) -> Cipher:
        self.stats.additions += 1
        return Cipher(self.ctx.he.add_plain(c.ct, self.encode(slots), True), c.budget)

    def sub_ct_pt(self, c: Cipher, slots) -> Cipher:
        return self.add_ct_pt(c, np.mod(-np.asarray(slots, np.int64), self.config.t))

    def sum(self, cs: list[Cipher]) -> Cipher:
        if not cs:
            raise ShapeError("cannot sum an empty list of ciphertexts")
        ct = cs[0].ct.copy() if hasattr(cs[0].ct, "copy") else cs[0].ct + 0
        for c in cs[1:]:
            ct += c.ct
        self.stats.additions += len(cs) - 1
        return Cipher(ct, self.noise.add(*[c.budget for c in cs]))

    def rotate(self, c: Cipher, k: int) -> Cipher:
        """Rotate each batching row left by k (slot i gets slot i+k)."""
        if k == 0:
            return c
        self.stats.rotations += 1
        return Cipher(self.ctx.he.rotate(c.ct, int(k), True), self.noise.after_rotate(c.budget))

    def swap_rows(self, c: Cipher) -> Cipher:
        self.stats.rotations += 1
        return Cipher(self.ctx.he.flip(c.ct, True), self.noise.after_rotate(c.budget))

    def window_sum(self, c: Cipher, width: int, stride: int = 1) -> Cipher:
        """Slot s gets sum_{u<width} c[s + u*stride] (rotate-and-add, log2(width)+popcount steps)."""
        if width <= 1:
            return c
        power, acc, offset = c, None, 0  # power[s] = sum_{u<2^j} c[s + u*stride]
        bits = bin(width)[2:][::-1]
        for j, bit in enumerate(bits):
            if bit == "1":
                term = self.rotate(power, offset * stride) if offset else power
                acc = term if acc is None else self.add_ct_ct(acc, term)
                offset += 1 << j
            if j + 1 < len(bits):
                power = self.add_ct_ct(power, self.rotate(power, (1 << j) * stride))
        return acc

    @staticmethod
    def window_sum_steps(width: int, stride: int = 1) -> set[int]:
        steps, offset = set(), 0
        bits = bin(width)[2:][::-1] if width > 1 else ""
        for j, bit in enumerate(bits):
            if bit == "1":
                if offset:
                    steps.add(offset * stride)
                offset += 1 << j
            if j + 1 < len(bits):
                steps.add((1 << j) * stride)
        return steps
