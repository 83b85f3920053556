"""Exception types of the HE engine (CryptoGen 2026 HE layer).

Every error raised by ``cryptogen.he`` on bad input is one of these. Messages name
shapes, positions, kinds and fingerprints only -- never plaintext values, shares,
masks or key material (DESIGN §5: nothing secret in logs or errors).
"""
from __future__ import annotations


class HEError(Exception):
    """Base class of all HE-engine errors."""


class ConfigError(HEError, ValueError):
    """HE parameters are invalid, insecure, or cannot hold the stated value ranges."""


class SerializationError(HEError, ValueError):
    """Bytes are not a valid CryptoGen HE envelope (bad magic, truncated, corrupted)."""


class WrongKindError(SerializationError):
    """An envelope holds a different kind of object than the caller asked for."""


class ParameterMismatchError(HEError, ValueError):
    """An object was produced under a different HE parameter set (fingerprint differs)."""


class KeyMismatchError(HEError, ValueError):
    """An object was produced under a different key set (same parameters, other keys)."""


class SecretKeyError(HEError, PermissionError):
    """A secret-key operation was attempted on a server-side (public) context,
    or a server-side object was handed a client key set."""


class ShapeError(HEError, ValueError):
    """An operand's shape or layout does not match what the kernel expects."""


class CachePositionError(HEError, ValueError):
    """A KV-cache write targets a position other than the next free one."""


class NoiseBudgetError(HEError, RuntimeError):
    """A ciphertext has too little noise budget left and no refresh is possible."""
