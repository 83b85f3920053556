"""HE parameters (CryptoGen 2026 §HE; SEAL BFV through Pyfhel).

Steps:
  1. :class:`HEConfig` names the scheme (BFV), ring degree ``n``, plaintext modulus ``t``
     (the shared field of ``cryptogen.field``) and coefficient-modulus prime sizes; the primes
     themselves are the ones SEAL's ``CoeffModulus::Create`` picks (``expected_qi``).
  2. ``HEConfig.__post_init__`` checks: ``t`` prime and ``t = 1 mod 2n`` (SIMD batching),
     ``sum(qi_sizes)`` within SEAL's bound for the security level at ``n``
     (HomomorphicEncryption.org standard table, as enforced by SEAL), the value ranges fit
     the field at their fixed-point scales, and the *worst-case* noise bounds
     (:mod:`cryptogen.he.noise`) leave room for a rotation, one ct x pt and noise flooding
     at ``flood_sigma`` bits over ``2^max_exports_log2`` exports. With t ~ 2^42 this rejects
     n = 8192 (at most 180 data bits; needs ~190, see docs/HE.md "Worst-case flooding").
  3. ``fingerprint`` hashes the parameters; every serialized object carries it.

Who learns what: parameters are public. Cost: none (pure validation; prime search cached).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass

from cryptogen.field import DEFAULT_FRAC_BITS, DEFAULT_T, FixedPoint

from .errors import ConfigError

# Max total coefficient-modulus bits for the given security level (SEAL's CoeffModulus::MaxBitCount).
SEAL_MAX_BITS = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}
# SEAL's default (BFVDefault) prime sizes for 128-bit security; the last prime is the
# special (key-switching) prime and carries no data.
SEAL_DEFAULT_QI = {
    4096: (36, 36, 37), 8192: (43, 43, 44, 44, 44),
    16384: (48, 48, 48, 49, 49, 49, 49, 49, 49), 32768: (55,) * 6 + (56,) * 10,
}


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if p % a == 0:
            return p == a
    d, s = p - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        x = pow(a, d, p)
        if x in (1, p - 1):
            continue
        for _ in range(s - 1):
            x = x * x % p
            if x == p - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=32)
def _seal_primes(n: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    table = {}
    for size in sorted(set(sizes)):
        count, found, v = sizes.count(size), [], (1 << size) - 2 * n + 1
        while len(found) < count and v > (1 << (size - 1)):
            if _is_prime(v):
                found.append(v)
            v -= 2 * n
        if len(found) < count:
            raise ConfigError(f"not enough {size}-bit primes = 1 mod 2n={2 * n}")
        table[size] = found
    return tuple(table[s].pop() for s in sizes)


MIN_FLOOD_SIGMA = 40  # bits of statistical distance of a key's whole export transcript (noise.py step 8)


@dataclass(frozen=True)
class HEConfig:
    """Public HE parameters. Frozen; validated on construction."""

    n: int = 16384
    t: int = DEFAULT_T
    # 276 bits (<= 438, the 128-bit bound at n=16384; also <= 305, the 192-bit one); 216 data bits,
    # special prime 60 bits >= the data primes (small key-switch noise) -- docs/HE.md "Worst-case flooding"
    qi_sizes: tuple[int, ...] = (54, 54, 54, 54, 60)
    scheme: str = "bfv"
    security_bits: int = 128
    frac_bits: int = DEFAULT_FRAC_BITS
    flood_sigma: int = 40            # flooding: statistical distance <= 2^-sigma over a key's whole transcript
    max_exports_log2: int = 20       # a key may export at most 2^X ciphertexts (engine refuses beyond)
    max_abs_input: float = 1024.0    # |x| of values entering HE at scale 2^f
    max_abs_output: float = 65536.0  # |y| of a product result at scale 2^(2f)

    def __post_init__(self) -> None:
        object.__setattr__(self, "qi_sizes", tuple(int(q) for q in self.qi_sizes))
        self._check_ring()
        self._check_security()
        self._check_ranges()
        self._check_noise_room()

    def _check_ring(self) -> None:
        if self.scheme != "bfv":
            raise ConfigError(f"scheme {self.scheme!r} unsupported: the engine uses BFV (see docs/HE.md)")
        if self.n not in SEAL_MAX_BITS[128]:
            raise ConfigError(f"n={self.n} must be a power of two in [1024, 32768]")
        if not _is_prime(self.t) or self.t >= 1 << 42:
            raise ConfigError("t must be a prime below 2^42 (cryptogen.field)")
        if (self.t - 1) % (2 * self.n):
            raise ConfigError(f"t must be 1 mod 2n={2 * self.n} for SIMD batching")
        if len(self.qi_sizes) < 2 or any(not 20 <= q <= 60 for q in self.qi_sizes):
            raise ConfigError("qi_sizes needs >=2 primes of 20..60 bits (last one is the special prime)")

    def _check_security(self) -> None:
        if not 0 <= self.max_exports_log2 <= 40:
            raise ConfigError(f"max_exports_log2 must be in [0, 40], got {self.max_exports_log2}")
        if self.flood_sigma < MIN_FLOOD_SIGMA:
            raise ConfigError(f"flood_sigma must be at least {MIN_FLOOD_SIGMA} bits (statistical distance of a key's "
                              f"whole transcript of 2^max_exports_log2 exports: circuit privacy of the server's "
                              f"weights), got {self.flood_sigma}")
        table = SEAL_MAX_BITS.get(self.security_bits)
        if table is None:
            raise ConfigError(f"security_bits must be one of {sorted(SEAL_MAX_BITS)}")
        if sum(self.qi_sizes) > table[self.n]:
            raise ConfigError(
                f"coefficient modulus of {sum(self.qi_sizes)} bits exceeds {table[self.n]} bits, "
                f"the bound for {self.security_bits}-bit security at n={self.n}")

    def _check_ranges(self) -> None:
        half = self.t // 2
        if self.max_abs_input * 2 ** self.frac_bits >= half:
            raise ConfigError("max_abs_input does not fit Z_t at scale 2^f")
        if self.max_abs_output * 2 ** (2 * self.frac_bits) >= half:
            raise ConfigError("max_abs_output does not fit Z_t at scale 2^(2f)")

    def _check_noise_room(self) -> None:
        from .noise import NoiseModel  # local import: noise depends on params

        model = NoiseModel(self)
        after = model.after_ct_pt(model.after_rotate(model.fresh))
        if not model.can_send(after):
            raise ConfigError(
                f"n={self.n} with a {self.data_modulus_bits}-bit data modulus leaves no room for a rotation, one "
                f"ct x pt and noise flooding at {self.flood_sigma} bits over 2^{self.max_exports_log2} exports "
                f"(worst-case bounds); use n >= 16384 or more data bits")

    @property
    def expected_qi(self) -> tuple[int, ...]:
        """The primes SEAL's ``CoeffModulus::Create(n, qi_sizes)`` picks: per size, the largest primes
        = 1 mod 2n below 2^size, handed out in increasing order (same algorithm, so equal)."""
        return _seal_primes(self.n, self.qi_sizes)

    @property
    def slots(self) -> int:
        return self.n

    @property
    def row(self) -> int:
        """Slots per batching row; rotations are cyclic within a row of n/2 slots."""
        return self.n // 2

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.qi_sizes[:-1])

    @property
    def fixed_point(self) -> FixedPoint:
        return FixedPoint(self.t, self.frac_bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qi_sizes"] = list(self.qi_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HEConfig":
        d = dict(d)
        d["qi_sizes"] = tuple(d["qi_sizes"])
        return cls(**d)

    @property
    def fingerprint(self) -> bytes:
        """16-byte hash of the parameters that determine ciphertext compatibility."""
        core = {"scheme": self.scheme, "n": self.n, "t": self.t, "qi": list(self.qi_sizes),
                "sec": self.security_bits}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).digest()[:16]

    @property
    def log2_n(self) -> int:
        return int(math.log2(self.n))
