"""Arithmetic in Z_t, the prime field shared by HE plaintexts and 2PC secret shares.

Both parties import this module. Secret shares (DESIGN §2) live in the same prime
field as the BFV/BGV plaintext modulus ``t`` so that converting between a ciphertext
and additive shares is a single masked addition.

Representation: elements are ``np.int64`` arrays with values in ``[0, t)``.
``t < 2**42`` so that ``mul`` can split one operand into two 21-bit limbs and never
overflow int64 (``a * b_limb < 2**63``).

Fixed point: a real ``x`` is encoded as ``round(x * 2**f) mod t``; field elements above
``t // 2`` decode as negatives. A value at scale ``2**f`` times another at ``2**f`` is at
scale ``2**(2f)`` and must be truncated (a 2PC protocol, see ``cryptogen.mpc``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# 42-bit prime, t = 1 (mod 2**16): batching-friendly for every N <= 32768 (needs t = 1 mod 2N).
DEFAULT_T = 4398044938241
DEFAULT_FRAC_BITS = 12
_LIMB = 21
_LIMB_MASK = (1 << _LIMB) - 1


class FieldError(ValueError):
    """A value is not a valid element of Z_t or does not fit the fixed-point range."""


def _check_modulus(t: int) -> None:
    if not (2 < t < (1 << 42)):
        raise FieldError(f"field modulus t={t} must be an odd prime below 2**42")


def as_field(x, t: int) -> np.ndarray:
    """Reduce integers (any sign) into [0, t) as int64."""
    a = np.asarray(x)
    if a.dtype == object:
        return np.array(np.mod(a, t), dtype=np.int64)
    return np.mod(a.astype(np.int64, copy=False), t)


def add(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    return np.mod(np.asarray(a, np.int64) + np.asarray(b, np.int64), t)


def sub(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    return np.mod(np.asarray(a, np.int64) - np.asarray(b, np.int64), t)


def neg(a: np.ndarray, t: int) -> np.ndarray:
    return np.mod(-np.asarray(a, np.int64), t)


def mul(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """Elementwise a*b mod t for a, b in [0, t), t < 2**42, without overflow."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    hi = np.mod(a * (b >> _LIMB), t)  # < 2**63
    return np.mod(np.mod(hi << _LIMB, t) + np.mod(a * (b & _LIMB_MASK), t), t)


def mul_const(a: np.ndarray, c: int, t: int) -> np.ndarray:
    """a * c mod t for a public integer constant c (any sign)."""
    return mul(a, np.int64(c % t), t)


def matmul(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """(a @ b) mod t for field matrices, exact.

    Both operands are split into three 14-bit limbs; each limb product is < 2**28 and
    a float64 BLAS matmul of them is exact while the inner dimension is < 2**24.
    """
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if a.shape[-1] >= (1 << 24):
        raise FieldError("inner dimension too large for exact field matmul")
    la = [((a >> (14 * i)) & 0x3FFF).astype(np.float64) for i in range(3)]
    lb = [((b >> (14 * i)) & 0x3FFF).astype(np.float64) for i in range(3)]
    out = None
    for i in range(3):
        for j in range(3):
            part = np.mod((la[i] @ lb[j]).astype(np.int64), t)
            term = mul_const(part, pow(2, 14 * (i + j), t), t)
            out = term if out is None else add(out, term, t)
    return out


STREAM_MIN_BYTES = 1 << 12
_ZEROS = memoryview(bytes(1 << 20))  # the keystream is AES-CTR of zeros, a MiB per call into OpenSSL


def random_bytes(nbytes: int) -> bytearray:
    """``nbytes`` from a CSPRNG: ``os.urandom`` for short requests; from STREAM_MIN_BYTES on, the
    keystream of AES-256-CTR under a fresh 32-byte ``os.urandom`` key (counter from 0; one key per
    call, so no stream is ever reused), written in place into one writable buffer (both paths return
    a writable bytearray). Here os.urandom
    gives ~0.3 GB/s, the AES stream 5-8 GB/s: the dealer draws ~0.3 GB per GPT-2 decode step at 511."""
    if nbytes < STREAM_MIN_BYTES:
        return bytearray(os.urandom(nbytes))
    out = bytearray(nbytes + 15)  # update_into wants a block of slack after what it writes
    view, enc = memoryview(out), Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    for off in range(0, nbytes, len(_ZEROS)):
        m = min(len(_ZEROS), nbytes - off)
        enc.update_into(_ZEROS[:m], view[off:off + m + 15])
    view.release()
    del out[nbytes:]
    return out


def random_elements(shape, t: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Uniform elements of Z_t.

    With ``rng=None`` (every protocol run) the bits come from ``random_bytes`` (a CSPRNG)
    and rejection sampling makes the result exactly uniform. A numpy ``rng`` is accepted
    only for reproducible tests.
    """
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    bits = int(t - 1).bit_length()
    mask = np.uint64((1 << bits) - 1)
    parts, have = [], 0
    while have < n:
        need = (n - have) + 16
        if rng is None:
            raw = np.frombuffer(random_bytes(8 * need), np.uint64)  # writable
        else:
            raw = rng.integers(0, np.iinfo(np.uint64).max, size=need, dtype=np.uint64, endpoint=True)
        np.bitwise_and(raw, mask, out=raw)
        cand = raw.view(np.int64)
        parts.append(cand[cand < t])  # rejection: exactly uniform on [0, t)
        have += parts[-1].size
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out[:n].reshape(shape)


def to_signed(a: np.ndarray, t: int) -> np.ndarray:
    """Map [0, t) to (-t/2, t/2]."""
    a = np.asarray(a, np.int64)
    return np.where(a > t // 2, a - t, a)


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed-point encoding into Z_t with ``frac_bits`` fractional bits."""

    t: int = DEFAULT_T
    frac_bits: int = DEFAULT_FRAC_BITS

    def __post_init__(self) -> None:
        _check_modulus(self.t)
        if not 0 <= self.frac_bits <= 20:
            raise FieldError(f"frac_bits={self.frac_bits} must be in [0, 20]")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude a value at scale 2**f may have."""
        return (self.t // 2) / self.scale

    def encode(self, x, scale_bits: int | None = None) -> np.ndarray:
        """Round reals to integers at scale 2**scale_bits (default f) and map into Z_t."""
        s = self.frac_bits if scale_bits is None else scale_bits
        v = np.rint(np.asarray(x, np.float64) * float(1 << s))
        if not np.all(np.isfinite(v)):
            raise FieldError("cannot encode NaN or infinite values")
        if np.any(np.abs(v) > self.t // 2):
            raise FieldError(
                f"value out of fixed-point range: |x| must be below {(self.t // 2) / (1 << s):.4g} "
                f"at {s} fractional bits")
        return np.mod(v.astype(np.int64), self.t)

    def decode(self, a, scale_bits: int | None = None) -> np.ndarray:
        """Field elements (signed interpretation) to float64 at scale 2**scale_bits."""
        s = self.frac_bits if scale_bits is None else scale_bits
        return to_signed(a, self.t).astype(np.float64) / float(1 << s)
