"""Compact wire forms of BFV ciphertexts (both parties import this; issue #12, bytes per token).

A SEAL ciphertext stores every coefficient in a 64-bit word, although a coefficient mod a 54-bit
prime needs 54 bits; and a fresh encryption's second polynomial ``c1`` is uniformly random. Two
forms cut the bytes without touching the cryptography:

* **packed** (every ciphertext, both directions): each coefficient mod q_i is written in
  ``q_i.bit_length()`` bits. At N = 16384 with 4 data primes of 54 bits: 885 KB instead of 1 MiB.
* **seeded** (the client's uploads): symmetric RLWE encryption ``(c0, c1) = (Delta*m + e - a*s, a)``
  with ``a`` expanded from a fresh 32-byte seed; only ``c0`` and the seed travel, and the server
  expands ``a`` again. This is SEAL's own ``encrypt_symmetric`` with ``save_seed`` (which Pyfhel does
  not expose), built from SEAL's operations:

  1. once per key set: the secret key's coefficients ``s`` (ternary) -- the client decrypts the
     constant ciphertext ``(0, floor(Q/t))``, whose phase is ``floor(Q/t)*s``, so the plaintext is ``s``;
  2. per ciphertext: a fresh seed from ``os.urandom``; ``a`` = rejection-sampled uniform residues mod
     each q_i from AES-256-CTR (``cryptography``/OpenSSL) keyed by the seed, prime i's stream starting
     at counter block ``i * 2^64`` (:func:`expand_seed`);
  3. SEAL computes ``-a*s`` exactly (``multiply_plain`` of ``(a, a)`` by the plaintext ``-s``, lifted
     centred) and ``Delta*m - a*s`` (``add_plain``, SEAL's BFV scaling);
  4. ``e``: SEAL's error distribution, a centred binomial of 21 + 21 bits (sigma = 3.24) from
     ``field.random_bytes`` (AES-256-CTR under a fresh ``os.urandom`` key), added to ``c0``.

Who learns what: the seed is public, ``a`` is uniform given it, and ``c0`` is an RLWE sample under the
client's secret key: the server learns what a SEAL symmetric ciphertext tells it, nothing. Packing is
a re-encoding of public bytes. Cost (N = 16384, 4 primes): seeded encryption ~5 ms with the NTT
kernel (steps 3-4 in one C call, ``_ntt.seeded_c0``: the same words as SEAL's operations), ~15 ms
without, against ~11 ms for public-key encryption; expanding a seed ~0.5 ms; packing or unpacking ~1.5 ms.
"""
from __future__ import annotations

import os
import struct
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..field import random_bytes
from .errors import SerializationError

try:  # the wire's kernels (setup.py; bin/bootstrap always builds them): the packing and switching in C
    from . import _wire
except ImportError:  # pragma: no cover - a checkout without the build step
    _wire = None

SEED_BYTES = 32
# SEAL ciphertext bytes up to its coefficient words: SEAL header (16) | parms_id (32) | is_ntt_form u8
# | size u64 | degree u64 | coeff_modulus_size u64 | scale f64 | correction factor u64
# | data array: SEAL header (16) | count u64
PREFIX = 16 + 32 + 1 + 8 * 5 + 16 + 8
# SEAL plaintext bytes up to its coefficient words: SEAL header (16) | parms_id (32) | coeff_count u64
# | scale f64 | data array: SEAL header (16) | count u64
PLAIN_PREFIX = 16 + 32 + 8 + 8 + 16 + 8
_FIELDS = struct.Struct("<32sBQQQ")
_SEAL_HEAD = struct.Struct("<HBBBBHQ")
FORMS = ("packed", "seeded", "switched")
_M32 = np.uint64(0xFFFFFFFF)


def mulmod_scalar(a: np.ndarray, c: int, q: int) -> np.ndarray:
    """a * c mod q for uint64 a < q < 2^63 and a Python int c (Shoup's multiplication: the quotient is
    the high word of a * floor(c 2^64 / q), computed from 32-bit halves; uint64 products wrap)."""
    c %= q
    wp, qq = (c << 64) // q, np.uint64(q)
    w0, w1, s32 = np.uint64(wp & 0xFFFFFFFF), np.uint64(wp >> 32), np.uint64(32)
    a0, a1 = a & _M32, a >> s32
    mid1 = a1 * w0 + ((a0 * w0) >> s32)
    mid2 = a0 * w1 + (mid1 & _M32)
    hi = a1 * w1 + (mid1 >> s32) + (mid2 >> s32)
    with np.errstate(over="ignore"):
        r = a * np.uint64(c) - hi * qq  # exact value in [0, 2q)
    return np.where(r >= qq, r - qq, r)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """``values`` (uint64, each below 2^bits, length a multiple of 64) in ``bits`` bits each (one C call
    with the HE kernels built, else ``pack_bits_np``: the same bytes)."""
    v = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if _wire is None:
        return pack_bits_np(v, bits)
    out = bytearray(packed_len(v.size, bits))
    _wire.pack(out, v, bits, v.size)
    return bytes(out)


def pack_bits_np(values: np.ndarray, bits: int) -> bytes:
    g = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1, 64)
    out = np.zeros((g.shape[0], bits), np.uint64)
    for j in range(64):
        w, s = divmod(j * bits, 64)
        out[:, w] |= g[:, j] << np.uint64(s)
        if s + bits > 64:
            out[:, w + 1] |= g[:, j] >> np.uint64(64 - s)
    return out.tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``bits`` bits from ``data``."""
    if _wire is None:
        return unpack_bits_np(data, bits, count)
    out = np.empty(count, np.uint64)
    _wire.unpack(out, data, bits, count)
    return out


def unpack_bits_np(data: bytes, bits: int, count: int) -> np.ndarray:
    g = np.frombuffer(data, np.uint64).reshape(-1, bits)
    out = np.empty((g.shape[0], 64), np.uint64)
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    for j in range(64):
        w, s = divmod(j * bits, 64)
        v = g[:, w] >> np.uint64(s)
        if s + bits > 64:
            v = v | (g[:, w + 1] << np.uint64(64 - s))
        out[:, j] = v & mask
    return out.reshape(count)


def packed_len(count: int, bits: int) -> int:
    return count // 64 * bits * 8


def expand_seed(seed: bytes, moduli, n: int) -> np.ndarray:
    """(len(moduli), n) uniform residues: prime i's AES-256-CTR stream (key = seed, first counter
    block i * 2^64), each 64-bit little-endian word cut to q_i's bit length and kept if below q_i."""
    out = np.empty((len(moduli), n), np.uint64)
    for i, q in enumerate(moduli):
        enc = Cipher(algorithms.AES(seed), modes.CTR((i << 64).to_bytes(16, "big"))).encryptor()
        mask, qq, got, have = np.uint64((1 << int(q).bit_length()) - 1), np.uint64(q), [], 0
        while have < n:  # the acceptance rate is q / 2^bits > 1/2
            x = np.frombuffer(enc.update(bytes(8 * n)), np.uint64) & mask
            x = x[x < qq]
            got.append(x)
            have += x.size
        out[i] = np.concatenate(got)[:n]
    return out


def cbd_noise(n: int) -> np.ndarray:
    """SEAL's RLWE error: centred binomial, popcount of 21 random bits minus popcount of 21 more
    (the bits from field.random_bytes, a CSPRNG)."""
    x = np.frombuffer(random_bytes(8 * n), np.uint64)
    m = np.uint64((1 << 21) - 1)
    return np.bitwise_count(x & m).astype(np.int64) - np.bitwise_count((x >> np.uint64(21)) & m).astype(np.int64)


def read_prefix(payload: bytes) -> dict:
    """The layout a ciphertext's SEAL prefix claims (``ntt``, ``size``, ``n``, ``k``), checked to be a
    plain SEAL object whose data array holds exactly size * k * n words; a peer's bytes, read
    before anything is sized by them."""
    if len(payload) < PREFIX:
        raise SerializationError("ciphertext: SEAL header truncated")
    magic, hsize, _maj, _min, compr, _res, total = _SEAL_HEAD.unpack_from(payload, 0)
    _parms, ntt, size, n, k = _FIELDS.unpack_from(payload, _SEAL_HEAD.size)
    dmagic, dhsize, _a, _b, dcompr, _c, dtotal = _SEAL_HEAD.unpack_from(payload, PREFIX - 24)
    (count,) = struct.unpack_from("<Q", payload, PREFIX - 8)
    if (magic != 0xA15E or dmagic != 0xA15E or hsize != 16 or dhsize != 16 or compr or dcompr
            or not (n and size and k) or n > 1 << 17 or size > 16 or k > 64
            or count != size * k * n or total != PREFIX + 8 * count or dtotal != 24 + 8 * count):
        raise SerializationError("ciphertext: SEAL object unreadable (bad header or compressed)")
    return {"ntt": int(ntt), "size": int(size), "n": int(n), "k": int(k)}


def ct_words(raw: bytes) -> np.ndarray:
    """A SEAL ciphertext's bytes -> a read-only view of its words (size, k, n)."""
    head = read_prefix(raw)
    return np.frombuffer(raw, np.uint64, offset=PREFIX).reshape(head["size"], head["k"], head["n"])


def _runs(widths, rows: int) -> list[tuple[int, int]]:
    """[(first, last + 1)] of consecutive primes with one width: each run packs in one call (the
    bytes are the same as prime by prime, as every row holds a multiple of 64 values)."""
    runs = []
    for i in range(rows):
        if runs and widths[i] == widths[runs[-1][0]]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _pack(words: np.ndarray, widths) -> bytes:
    """(size, rows, n) residues -> each prime's rows (all polynomials) in that prime's width."""
    return b"".join(pack_bits(words[:, a:b].transpose(1, 0, 2), widths[a])
                    for a, b in _runs(widths, words.shape[1]))


def _unpack(payload: bytes, off: int, shape: tuple[int, int, int], widths, form: str) -> np.ndarray:
    """Inverse of :func:`_pack` for the bytes from ``off`` on, which must be exactly that long."""
    size, rows, n = shape
    lens = [packed_len(size * n, widths[i]) for i in range(rows)]
    if len(payload) != off + sum(lens):
        raise SerializationError(f"ciphertext: {form} payload of {len(payload)} bytes, expected {off + sum(lens)}")
    out = np.empty(shape, np.uint64)
    for a, b in _runs(widths, rows):
        end = off + sum(lens[a:b])
        out[:, a:b] = unpack_bits(payload[off:end], widths[a], (b - a) * size * n).reshape(b - a, size, n).transpose(1, 0, 2)
        off = end
    return out


def to_packed(prefix: bytes, words: np.ndarray, widths) -> bytes:
    """A SEAL ciphertext's prefix and words (size, k, n) -> prefix | each (polynomial, prime) row in its
    prime's width."""
    return prefix[:PREFIX] + _pack(words, widths)


def from_packed(payload: bytes, head: dict, widths) -> bytes:
    """Inverse of :func:`to_packed` (``head`` from :func:`read_prefix`, already checked)."""
    shape = (head["size"], head["k"], head["n"])
    return payload[:PREFIX] + _unpack(payload, PREFIX, shape, widths, "packed").tobytes()


def switch_primes(qi_sizes, t: int, n: int) -> int:
    """How many data primes a download keeps: the fewest whose product Q' makes the switch's rounding
    term t (1 + N) / Q' at most 2^-41 (2^-40 of the decryption threshold 1/2). At the defaults: 2 of 4."""
    need, have = t.bit_length() + (n + 1).bit_length() + 41, 0
    for j, b in enumerate(qi_sizes[:-1], 1):
        have += b - 1  # a b-bit prime is at least 2^(b-1)
        if have >= need:
            return j
    return len(qi_sizes) - 1


def switch_down(words: np.ndarray, moduli, keep: int) -> np.ndarray:
    """BFV modulus switching in RNS (the server, after flooding): (size, k, n) residues mod q_0..q_{k-1}
    -> (size, keep, n) residues of round(c * Q'/Q) mod Q' = q_0..q_{keep-1}, dropping the last prime k - keep
    times: c_i <- q_L^-1 (c_i - [c_L]) mod q_i with [c_L] the centred residue (exact rounding). The
    invariant noise stays v + t * rounding / Q'; a deterministic map of the flooded ciphertext. One C
    call with the HE kernels built, else ``switch_down_np`` (the same words)."""
    if _wire is None:
        return switch_down_np(words, moduli, keep)
    w = np.array(words, np.uint64, order="C")
    size, k, n = w.shape
    _wire.switch_down(w, np.array(moduli[:k], np.uint64), _switch_inverses(tuple(int(q) for q in moduli[:k])),
                     size, k, keep, n)
    return w[:, :keep]


@lru_cache(maxsize=16)
def _switch_inverses(qs: tuple[int, ...]) -> np.ndarray:
    """(k, k, 2): q_L^-1 mod q_i and its Shoup quotient, at [L][i] for i < L."""
    k = len(qs)
    out = np.zeros((k, k, 2), np.uint64)
    for L in range(k):
        for i in range(L):
            m = pow(qs[L], -1, qs[i])
            out[L, i] = (m, (m << 64) // qs[i])
    return out


def switch_down_np(words: np.ndarray, moduli, keep: int) -> np.ndarray:
    w = words.copy()
    for L in range(words.shape[1] - 1, keep - 1, -1):
        qL, cL = int(moduli[L]), w[:, L]
        neg = cL > np.uint64(qL // 2)
        for i in range(L):
            qi = int(moduli[i])
            with np.errstate(over="ignore"):  # wraps only where not taken
                r = np.where(neg, cL + np.uint64(qi) - np.uint64(qL), cL)  # centred residue mod q_i (q_i > q_L/2)
            w[:, i] = mulmod_scalar(np.mod(w[:, i] + np.uint64(qi) - r, np.uint64(qi)), pow(qL, -1, qi), qi)
    return w[:, :keep]


def lift_up(words: np.ndarray, moduli, k: int) -> np.ndarray:
    """The client: a ciphertext mod Q' as one mod Q = Q' * P, scaled by P (exact: P c' mod Q depends only on
    c' mod Q'). Its phase is P times the switched one, so SEAL decrypts it at the top level, same noise budget."""
    size, keep, n = words.shape
    p = 1
    for q in moduli[keep:k]:
        p *= int(q)
    out = np.zeros((size, k, n), np.uint64)
    for i in range(keep):
        out[:, i] = mulmod_scalar(words[:, i], p, int(moduli[i]))
    return out


def to_switched(prefix: bytes, words: np.ndarray, widths, moduli, keep: int) -> bytes:
    """A download, from its SEAL prefix and words (size, k, n): switched to ``keep`` primes, then
    packed -> prefix (the top level's) | kept rows."""
    return prefix[:PREFIX] + _pack(switch_down(words, moduli, keep), widths)


def switched_words(payload: bytes, head: dict, widths, moduli, keep: int) -> np.ndarray:
    """A download's words (size, keep, n), each checked to be below its prime."""
    low = _unpack(payload, PREFIX, (head["size"], keep, head["n"]), widths, "switched")
    if any(int(low[:, i].max()) >= int(moduli[i]) for i in range(keep)):
        raise SerializationError("ciphertext: a coefficient is not below its prime")
    return low


def from_switched(payload: bytes, head: dict, widths, moduli, keep: int) -> bytes:
    """Inverse of :func:`to_switched` up to the scaling by P (:func:`lift_up`): SEAL bytes at the top level."""
    low = switched_words(payload, head, widths, moduli, keep)
    return payload[:PREFIX] + lift_up(low, moduli, head["k"]).tobytes()


def seeded_payload(prefix: bytes, seed: bytes, c0: np.ndarray, widths) -> bytes:
    """A fresh symmetric ciphertext whose c1 is ``expand_seed(seed)``, from its c0 (k, n) -> prefix | seed |
    packed c0 (``prefix``: a 2-polynomial ciphertext's at that level)."""
    return prefix[:PREFIX] + seed + _pack(c0[None], widths)


def from_seeded(payload: bytes, head: dict, widths, moduli) -> bytes:
    """Inverse of :func:`seeded_payload`: c1 expanded from the seed again (``moduli``: the data primes)."""
    k, n = head["k"], head["n"]
    if head["size"] != 2:
        raise SerializationError(f"ciphertext: {head['size']} polynomials, expected 2")
    c0 = _unpack(payload, PREFIX + SEED_BYTES, (1, k, n), widths, "seeded")
    c1 = expand_seed(payload[PREFIX:PREFIX + SEED_BYTES], moduli[:k], n)
    return payload[:PREFIX] + c0.tobytes() + c1.tobytes()
