"""Byte envelopes for everything that crosses between parties (CryptoGen HE layer).

Layout (little endian)::

    b"CGHE" | version u8 | kind u8 | params fingerprint (16) | key id (16)
    | meta length u32 | meta (JSON) | payload length u64 | payload | sha256(all before)[:16]

Steps on load: 1. length and magic, 2. checksum (truncation/corruption), 3. kind,
4. parameter fingerprint, 5. key id. Each failure raises its own exception type
(:mod:`cryptogen.he.errors`); messages carry kinds, lengths and fingerprints only.
``seal_context_params`` reads what a Pyfhel/SEAL context blob really holds (security level,
N, every coefficient-modulus prime, t) so the server checks those, not the envelope's metadata;
``seal_ciphertext_header`` a peer's ciphertext layout (NTT form, polynomials, degree, level) and
``seal_galois_elements`` which rotations a Galois-key blob really has keys for, before SEAL loads them.
Who learns what: an envelope reveals its kind, parameters and key id (all public).
Cost: one sha256 over the bytes.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from .errors import KeyMismatchError, ParameterMismatchError, SerializationError, WrongKindError

MAGIC = b"CGHE"
VERSION = 1
KINDS = {"public_context": 1, "ciphertext": 2, "client_keys": 3, "kv_cache": 4, "cipher_list": 5,
         "linear_weights": 6, "kv_delta": 7}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
_HEAD = struct.Struct("<4sBB16s16sI")
_DIGEST = 16


def pack(kind: str, fingerprint: bytes, key_id: bytes, meta: dict, payload: bytes) -> bytes:
    meta_b = json.dumps(meta, sort_keys=True).encode()
    body = (_HEAD.pack(MAGIC, VERSION, KINDS[kind], fingerprint, key_id, len(meta_b)) + meta_b
            + struct.pack("<Q", len(payload)) + payload)
    return body + hashlib.sha256(body).digest()[:_DIGEST]


def unpack(data: bytes, kind: str, fingerprint: bytes | None = None,
           key_id: bytes | None = None) -> tuple[dict, bytes, bytes, bytes]:
    """Check and open an envelope; returns (meta, payload, fingerprint, key_id)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"expected bytes for a {kind}, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size + 8 + _DIGEST:
        raise SerializationError(f"{kind}: truncated envelope ({len(data)} bytes)")
    magic, version, kcode, fp, kid, mlen = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise SerializationError(f"{kind}: not a CryptoGen HE envelope (bad magic or version)")
    off = _HEAD.size + mlen
    if len(data) < off + 8 + _DIGEST:
        raise SerializationError(f"{kind}: truncated envelope ({len(data)} bytes)")
    (plen,) = struct.unpack_from("<Q", data, off)
    end = off + 8 + plen
    if len(data) != end + _DIGEST:
        raise SerializationError(f"{kind}: truncated or padded envelope ({len(data)} bytes, expected {end + _DIGEST})")
    if hashlib.sha256(data[:end]).digest()[:_DIGEST] != data[end:]:
        raise SerializationError(f"{kind}: checksum mismatch (corrupted bytes)")
    if kcode != KINDS[kind]:
        raise WrongKindError(f"expected a {kind}, got a {_KIND_NAMES.get(kcode, 'unknown kind')}")
    if fingerprint is not None and fp != fingerprint:
        raise ParameterMismatchError(
            f"{kind} was made under HE parameters {fp.hex()}, this context uses {fingerprint.hex()}")
    if key_id is not None and kid != key_id:
        raise KeyMismatchError(f"{kind} belongs to key set {kid.hex()}, this context holds {key_id.hex()}")
    try:
        meta = json.loads(data[_HEAD.size:off].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"{kind}: unreadable metadata") from exc
    return meta, data[off + 8:end], fp, kid


def kind_of(data: bytes) -> str:
    """An envelope's kind from its header alone (``unpack`` checks the rest)."""
    if len(data) < _HEAD.size:
        raise SerializationError(f"truncated envelope ({len(data)} bytes)")
    magic, version, kcode, _, _, _ = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or kcode not in _KIND_NAMES:
        raise SerializationError("not a CryptoGen HE envelope (bad magic, version or kind)")
    return _KIND_NAMES[kcode]


def join_blobs(blobs: list[bytes]) -> bytes:
    out = [struct.pack("<I", len(blobs))]
    for b in blobs:
        out.append(struct.pack("<Q", len(b)))
        out.append(b)
    return b"".join(out)


def split_blobs(data: bytes) -> list[bytes]:
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        off, out = 4, []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", data, off)
            off += 8
            if off + n > len(data):
                raise SerializationError("blob list truncated")
            out.append(data[off:off + n])
            off += n
    except struct.error as exc:
        raise SerializationError("blob list truncated") from exc
    if off != len(data):
        raise SerializationError("blob list has trailing bytes")
    return out


# ---- SEAL context bytes (Pyfhel ``to_bytes_context("none")``) -------------------------------
_SEAL_MAGIC = 0xA15E
_SEAL_HEAD = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size


def _seal_object(data: bytes, off: int, what: str = "public context: SEAL parameters") -> tuple[int, int]:
    """Check one SEAL serialization header at ``off``; returns (body offset, end offset)."""
    magic, hsize, _major, _minor, compr, _res, size = _SEAL_HEAD.unpack_from(data, off)
    if (magic != _SEAL_MAGIC or hsize != _SEAL_HEAD.size or compr != 0 or size < _SEAL_HEAD.size
            or off + size > len(data)):
        raise SerializationError(f"{what} unreadable (bad header or compressed)")
    return off + hsize, off + size


def seal_blob(data: bytes, what: str) -> None:
    """A peer's SEAL object (key, ciphertext): one uncompressed object, exactly as long as its header says."""
    try:
        _body, end = _seal_object(data, 0, what)
    except struct.error as exc:
        raise SerializationError(f"{what} truncated") from exc
    if end != len(data):
        raise SerializationError(f"{what} has trailing bytes")


def seal_context_params(ctx_bytes: bytes) -> dict:
    """The parameters a Pyfhel/SEAL context blob really carries: Pyfhel's prefix (security level
    ``sec`` it asks SEAL to enforce) and SEAL's ``EncryptionParameters`` (scheme, ``n``, all
    coefficient-modulus primes ``qi`` -- data primes then the special prime -- and ``t``)."""
    try:
        (sec,) = struct.unpack_from("<i", ctx_bytes, 0)
        (count,) = struct.unpack_from("<Q", ctx_bytes, 4)
        if count > 64:
            raise SerializationError("public context: SEAL parameters unreadable (prime count)")
        body, end = _seal_object(ctx_bytes, 12 + 4 * count + 8)
        scheme, n, k = struct.unpack_from("<BQQ", ctx_bytes, body)
        if not 1 <= k <= 64:
            raise SerializationError("public context: SEAL parameters unreadable (prime count)")
        off, qi = body + 17, []
        for _ in range(k + 1):  # coefficient-modulus primes, then the plain modulus
            mbody, mend = _seal_object(ctx_bytes, off)
            (value,) = struct.unpack_from("<Q", ctx_bytes, mbody)
            qi.append(int(value))
            off = mend
    except struct.error as exc:
        raise SerializationError("public context: SEAL parameters truncated") from exc
    if off != end or end != len(ctx_bytes):
        raise SerializationError("public context: SEAL parameters have trailing bytes")
    return {"sec": int(sec), "scheme": int(scheme), "n": int(n), "qi": tuple(qi[:-1]), "t": qi[-1]}


# ---- SEAL ciphertext and Galois-key bytes ----------------------------------------------------
# A SEAL ciphertext blob: SEAL header (16) | parms_id (32) | is_ntt_form u8 | size u64 | degree u64
# | coeff_modulus_size u64 | scale f64 | correction factor u64 | data: SEAL header (16) | count u64 | words
_CT_FIELDS = struct.Struct("<32sBQQQ")
_KEY_PREFIX = 16 + _CT_FIELDS.size + 8 + 8 + 16 + 8  # bytes before a key part's words (as a ciphertext's)


def seal_ciphertext_header(payload: bytes) -> dict:
    """The layout fields of a SEAL ciphertext blob, read before SEAL sees it (a peer's bytes):
    ``ntt`` (form flag), ``size`` (polynomials), ``n`` (degree), ``k`` (primes, i.e. its level)."""
    seal_blob(payload, "ciphertext: SEAL object")
    try:
        _parms, ntt, size, n, k = _CT_FIELDS.unpack_from(payload, _SEAL_HEAD.size)
    except struct.error as exc:
        raise SerializationError("ciphertext: SEAL header truncated") from exc
    return {"ntt": int(ntt), "size": int(size), "n": int(n), "k": int(k)}


def public_key_words(pk_bytes: bytes, n: int, k: int) -> np.ndarray:
    """A SEAL ``PublicKey`` blob's words, (2, k, n) uint64 in NTT form over all k primes (the special one
    last), copied out. Call after SEAL accepted the key."""
    head = seal_ciphertext_header(pk_bytes)
    if not head["ntt"] or head["size"] != 2 or head["n"] != n or head["k"] != k or len(pk_bytes) < _KEY_PREFIX + 16 * k * n:
        raise SerializationError("public context: the public key is not a 2-polynomial NTT-form key at the key level")
    return np.frombuffer(pk_bytes, np.uint64, 2 * k * n, len(pk_bytes) - 16 * k * n).reshape(2, k, n).copy()


def galois_elt(step: int, n: int) -> int:
    """SEAL's Galois element of a BFV row rotation by ``step`` (0: the row swap), ring degree ``n``."""
    m = 2 * n
    if step == 0:
        return m - 1
    pos = abs(int(step))
    if pos >= n // 2:
        raise SerializationError(f"rotation step {step} is not below n/2")
    if step < 0:
        pos = n // 2 - pos
    return pow(3, pos, m)


def _galois_slots(gk_bytes: bytes):
    """(Galois element, [(offset, end) of each key part's SEAL object]) per non-empty slot of a
    ``GaloisKeys`` blob (SEAL keeps one slot per odd element 2i+1; an empty slot holds no key)."""
    seal_blob(gk_bytes, "public context: Galois keys")
    end = len(gk_bytes)
    slots_out = []
    try:
        off = _SEAL_HEAD.size + 32  # parms_id
        (slots,) = struct.unpack_from("<Q", gk_bytes, off)
        off += 8
        if slots > 1 << 16:
            raise SerializationError("public context: Galois keys unreadable (slot count)")
        for i in range(slots):
            (count,) = struct.unpack_from("<Q", gk_bytes, off)
            off += 8
            if count > 64:
                raise SerializationError("public context: Galois keys unreadable (key size)")
            parts = []
            for _ in range(count):
                start = off
                _b, off = _seal_object(gk_bytes, off, "public context: Galois keys")
                parts.append((start, off))
            if count:
                slots_out.append((2 * i + 1, parts))
    except struct.error as exc:
        raise SerializationError("public context: Galois keys truncated") from exc
    if off != end:
        raise SerializationError("public context: Galois keys have trailing bytes")
    return slots_out


def seal_galois_elements(gk_bytes: bytes) -> set[int]:
    """The Galois elements a SEAL ``GaloisKeys`` blob really holds keys for, so a context cannot
    claim rotations it lacks."""
    return {elt for elt, _parts in _galois_slots(gk_bytes)}


def seal_galois_key_words(gk_bytes: bytes, elts, n: int, k: int) -> dict[int, np.ndarray]:
    """The key words of the given Galois elements: (digits, 2, k, n) uint64 per element, NTT form
    over all k primes (the special one last), copied out of the blob. Call after SEAL accepted it."""
    out = {}
    want = set(elts)
    for elt, parts in _galois_slots(gk_bytes):
        if elt not in want:
            continue
        words = []
        for start, stop in parts:
            head = seal_ciphertext_header(gk_bytes[start:stop])
            if not head["ntt"] or head["size"] != 2 or head["n"] != n or head["k"] != k or stop - start != _KEY_PREFIX + 16 * k * n:
                raise SerializationError("public context: a Galois key part is not a 2-polynomial NTT-form key")
            words.append(np.frombuffer(gk_bytes, np.uint64, 2 * k * n, start + _KEY_PREFIX).reshape(2, k, n))
        out[elt] = np.stack(words)
    return out
