"""Key sets: the client's secret key set and the server's public evaluation context.

Construction: SEAL BFV key generation (through Pyfhel); the server receives only the
public key, the relinearisation key and the Galois keys of the rotation steps the
kernels use (DESIGN §2, §5).

Steps:
  1. Client: ``ClientKeys.generate(config, rotation_steps)`` -- secret key, public key,
     relin key, Galois keys for exactly ``rotation_steps`` (0 = row swap).
  2. Client: ``public_context_bytes()`` -> envelope (params fingerprint + key id).
  3. Server: ``PublicContext.from_bytes(data, expected)`` -- a Pyfhel object with no secret key;
     it can encrypt (public key), evaluate, and (de)serialize ciphertexts, never decrypt.
     N, t, the coefficient-modulus primes and the security level are read from the loaded SEAL
     context itself (not from the envelope's metadata) and must equal the server's HEConfig
     (``check_context_params``); sec < 128 (incl. Pyfhel's sec=0 = "no check") is refused. The
     metadata is compared as data (never built into an HEConfig), the claimed rotation steps must
     have Galois keys in the blob, and each key blob is one SEAL object of its stated length.
     The keys of steps 1..HOIST_STEPS-1 are also kept pre-permuted for hoisted rotations (he/hoist.py).
  4. Either party: ``ct_from_bytes`` -- a peer's ciphertext must be 2 polynomials, not in NTT form,
     of degree N at the top level (else SerializationError; SEAL would load some of these and
     fail later inside an operation with a library error).
Who learns what: the server learns public keys only. Cost: key generation ~0.1 s plus
~2.6 MB per Galois key at n=8192 (uncompressed: this Pyfhel build has no zstd/zlib).
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from Pyfhel import Pyfhel, PyCtxt, PyPtxt

from . import hoist, ntt, serialize, wire
from .decrypt import SwitchedDecryptor
from .errors import ConfigError, HEError, SecretKeyError, SerializationError, ShapeError
from .params import SEAL_MAX_BITS, HEConfig


def _context(config: HEConfig) -> Pyfhel:
    """A SEAL context with the config's primes (explicit ``qi``: Pyfhel then keeps our prime sizes)
    *and* SEAL's own HomomorphicEncryption.org check at ``security_bits`` (never sec=0)."""
    he = Pyfhel()
    status = he.contextGen(scheme="bfv", n=config.n, t=config.t, sec=config.security_bits,
                           qi=list(config.expected_qi))
    if not str(status).startswith("success"):
        raise ConfigError(f"SEAL refused the parameters ({status}); choose smaller qi_sizes or a larger n")
    return he


def check_context_params(actual: dict, config: HEConfig) -> None:
    """Refuse a loaded SEAL context whose real parameters (``serialize.seal_context_params``) are not
    ``config``'s or are below 128-bit security. One-line messages: what differs, what to do."""
    fix = "make the keys with cryptogen's ClientKeys.generate(<the server's HEConfig>)"
    if actual["sec"] < 128:
        raise SerializationError(f"public context: SEAL security level sec={actual['sec']} is below 128 bits "
                                 f"(sec=0 switches SEAL's check off); {fix}")
    if actual["sec"] != config.security_bits:
        raise SerializationError(f"public context: SEAL security level {actual['sec']} differs from the server's "
                                 f"{config.security_bits}; {fix}")
    bits, limit = sum(q.bit_length() for q in actual["qi"]), SEAL_MAX_BITS[128].get(actual["n"], 0)
    if bits > limit:
        raise SerializationError(f"public context: {bits}-bit coefficient modulus at N={actual['n']} is below "
                                 f"128-bit security (max {limit} bits); {fix}")
    for name, got, want in (("scheme", actual["scheme"], 1), ("poly modulus degree N", actual["n"], config.n),
                            ("plain modulus t", actual["t"], config.t),
                            ("coefficient-modulus primes", actual["qi"], config.expected_qi)):
        if got != want:
            shown = f"{len(got)} primes of {[q.bit_length() for q in got]} bits" if name.startswith("coeff") else got
            raise SerializationError(f"public context: SEAL {name} is {shown}, the server's parameters need "
                                     f"{want if not name.startswith('coeff') else list(config.qi_sizes)}; {fix}")


def _key_id(public_key_bytes: bytes) -> bytes:
    return hashlib.sha256(public_key_bytes).digest()[:16]


def _check_steps(config: HEConfig, steps) -> tuple[int, ...]:
    out = tuple(sorted({int(s) for s in steps}))
    if any(abs(s) >= config.row for s in out):
        raise ConfigError(f"rotation steps must be below n/2={config.row} in magnitude")
    return out


class _HEBase:
    """Shared by both parties: encoding, ciphertext envelopes."""

    config: HEConfig
    he: Pyfhel
    key_id: bytes
    rotation_steps: tuple[int, ...]

    def check_slots(self, slots) -> np.ndarray:
        a = np.asarray(slots)
        if a.shape != (self.config.n,):
            raise ShapeError(f"slot vector must have shape ({self.config.n},), got {a.shape}")
        return np.mod(a.astype(np.int64, copy=False), self.config.t)

    def encode(self, slots):
        return self.he.encodeInt(np.ascontiguousarray(self.check_slots(slots)))

    @property
    def widths(self) -> tuple[int, ...]:
        return self.config.qi_sizes[:-1]

    @property
    def switch_keep(self) -> int:
        return wire.switch_primes(self.config.qi_sizes, self.config.t, self.config.n)

    def ct_to_bytes(self, ct: PyCtxt, form: str = "packed") -> bytes:
        """A ciphertext in a wire form (``wire``): ``packed`` (each coefficient in its prime's bits) or
        ``switched`` (a download: first modulus-switched to ``switch_keep`` primes; only after flooding)."""
        raw = ct.to_bytes("none")
        return self.words_to_bytes(raw, wire.ct_words(raw), form)

    def words_to_bytes(self, prefix: bytes, words: np.ndarray, form: str = "packed") -> bytes:
        """``ct_to_bytes`` of the ciphertext with SEAL prefix ``prefix`` and words (size, k, n)."""
        body = (wire.to_switched(prefix, words, self.widths, self.qi, self.switch_keep) if form == "switched"
                else wire.to_packed(prefix, words, self.widths))
        return serialize.pack("ciphertext", self.config.fingerprint, self.key_id, {"form": form}, body)

    def _wire_head(self, data: bytes) -> tuple[str, bytes, dict]:
        """(form, SEAL payload, its checked prefix) of a peer's ciphertext bytes (``ct_from_bytes``)."""
        meta, payload, _, _ = serialize.unpack(data, "ciphertext", self.config.fingerprint, self.key_id)
        form = meta.get("form") if isinstance(meta, dict) else None
        if form not in wire.FORMS or len(meta) != 1:
            raise SerializationError(f"ciphertext: unknown wire form (expected one of {', '.join(wire.FORMS)})")
        head = wire.read_prefix(payload)
        if head["ntt"] or head["n"] != self.config.n or head["k"] != len(self.config.qi_sizes) - 1:
            raise SerializationError("ciphertext: not a BFV ciphertext of these parameters at the top level "
                                     "(NTT form, degree or prime count differ)")
        if head["size"] != 2:
            raise SerializationError(f"ciphertext: {head['size']} polynomials, expected 2")
        return form, payload, head

    def ct_from_bytes(self, data: bytes) -> PyCtxt:
        """A peer's ciphertext (packed, seeded or switched form): a fresh-form BFV ciphertext of 2 polynomials at
        the top level, in this key set (SEAL checks the coefficients; the layout is checked here first:
        SEAL would load an NTT-form or lower-level ciphertext that later fails inside an operation)."""
        form, payload, head = self._wire_head(data)
        if form == "packed":
            raw = wire.from_packed(payload, head, self.widths)
        elif form == "seeded":
            raw = wire.from_seeded(payload, head, self.widths, self.qi)
        else:
            raw = wire.from_switched(payload, head, self.widths, self.qi, self.switch_keep)
        try:
            return PyCtxt(pyfhel=self.he, bytestring=raw)
        except Exception as exc:  # SEAL rejects malformed ciphertexts (e.g. a coefficient >= q_i)
            raise SerializationError("ciphertext payload rejected by SEAL") from exc

    def encrypt_public(self, slots) -> PyCtxt:
        """Public-key encryption (either party may do it)."""
        return self.he.encryptPtxt(self.encode(slots))


class PublicContext(_HEBase):
    """Server-side evaluation context: public key, relin key, selected Galois keys; no secret key."""

    encoding_only = False

    def __init__(self, config: HEConfig, he: Pyfhel, key_id: bytes, rotation_steps: tuple[int, ...],
                 qi: tuple[int, ...], hoist_keys: dict | None = None):
        if not he.is_secret_key_empty():
            raise SecretKeyError("a public context must not hold a secret key")
        if tuple(q.bit_length() for q in qi) != config.qi_sizes or any((q - 1) % (2 * config.n) for q in qi):
            raise SerializationError("coefficient-modulus primes do not match the parameters")
        self.config, self.he, self.key_id, self.rotation_steps = config, he, key_id, rotation_steps
        self.qi = qi
        self.hoist_keys = hoist_keys or {}  # step -> hoist.GaloisKey (the small steps' keys, pre-permuted)
        self.giant_keys: dict = {}  # step -> hoist.GaloisKey (the giant steps asked for at load)

    @classmethod
    def from_bytes(cls, data: bytes, expected: HEConfig | None = None, giant_steps=()) -> "PublicContext":
        """Server: load a client's public context. N, t, the primes and the security level come from
        the SEAL context itself and must match ``expected`` (the server's own HEConfig).
        ``giant_steps``: the linear layers' giant steps, whose keys are kept for he/hoist.giant_sum."""
        meta, payload, fp, kid = serialize.unpack(
            data, "public_context", expected.fingerprint if expected else None)
        raw = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(raw, dict):
            raise SerializationError("public context metadata lacks a valid config")
        if expected is not None:  # compared as data: a peer's values never build an HEConfig here
            want = expected.to_dict()  # e.g. flood_sigma is the server's policy, not the client's
            diff = [k for k in want if raw.get(k) != want[k] or type(raw.get(k)) is not type(want[k])]
            extra = len(set(raw) - set(want))
            if diff or extra:
                shown = ", ".join(diff + ([f"{extra} unknown fields"] if extra else []))
                raise SerializationError(f"public context parameters differ from the server's in {shown}")
            config = expected
        else:
            try:
                config = HEConfig.from_dict(raw)
            except HEError:
                raise
            except Exception as exc:  # noqa: BLE001 - any malformed field
                raise SerializationError("public context metadata lacks a valid config") from exc
        if config.fingerprint != fp:
            raise SerializationError("public context metadata does not match its fingerprint")
        steps = meta.get("rotation_steps", [])
        if (not isinstance(steps, list) or len(steps) > config.row
                or not all(type(s) is int and abs(s) < config.row for s in steps)):
            raise SerializationError("public context metadata: rotation_steps must be a list of steps below n/2")
        blobs = serialize.split_blobs(payload)
        if len(blobs) != 4:
            raise SerializationError(f"public context holds {len(blobs)} parts, expected 4 (context, public key, "
                                     "relinearisation key, Galois keys)")
        ctx_b, pk_b, rk_b, gk_b = blobs
        if _key_id(pk_b) != kid:
            raise SerializationError("public key does not match the envelope key id")
        actual = serialize.seal_context_params(ctx_b)
        check_context_params(actual, config)  # before SEAL loads anything sized by these parameters
        serialize.seal_blob(pk_b, "public context: public key")
        serialize.seal_blob(rk_b, "public context: relinearisation key")
        present = serialize.seal_galois_elements(gk_b) if gk_b else set()
        lacking = [s for s in steps if serialize.galois_elt(s, config.n) not in present]
        if lacking:
            raise SerializationError(f"public context claims {len(lacking)} rotation steps it has no Galois keys for")
        he = Pyfhel()
        try:
            he.from_bytes_context(ctx_b)
            he.from_bytes_public_key(pk_b)
            he.from_bytes_relin_key(rk_b)
            if gk_b:
                he.from_bytes_rotate_key(gk_b)
        except Exception as exc:
            raise SerializationError("public context payload rejected by SEAL") from exc
        loaded = (int(he.sec), int(he.get_poly_modulus_degree()), int(he.get_plain_modulus()),
                  int(he.total_coeff_modulus_bit_count))
        if loaded != (actual["sec"], actual["n"], actual["t"], sum(q.bit_length() for q in actual["qi"][:-1])):
            raise SerializationError("public context: the loaded SEAL context disagrees with its parameter block")
        babies = {serialize.galois_elt(s, config.n): s for s in steps if 0 < s < hoist.HOIST_STEPS}
        giants = {serialize.galois_elt(s, config.n): s for s in set(giant_steps) & set(steps) if s > 0}
        elts = set(babies) | set(giants)
        raw = serialize.seal_galois_key_words(gk_b, elts, config.n, len(actual["qi"])) if elts else {}
        ctx = cls(config, he, kid, tuple(steps), actual["qi"],
                  {babies[e]: hoist.prepare_key(config.n, e, raw[e]) for e in babies if e in raw})
        ctx.giant_keys = hoist.stack_keys({giants[e]: hoist.prepare_key(config.n, e, raw[e], prepermute=False)
                                           for e in giants if e in raw})
        return ctx

    @classmethod
    def for_encoding(cls, config: HEConfig) -> "PublicContext":
        """The server's own context for encoding its weights once, before any client connects: the
        parameters only, no key at all (it cannot encrypt or rotate; sessions bring the client's
        public keys). Plaintexts encoded here work with any session context of the same parameters."""
        he = _context(config)
        ctx = cls(config, he, b"\0" * 16, (), tuple(int(q) for q in he.get_qi()))
        ctx.encoding_only = True
        return ctx

    def assert_public(self) -> None:
        if not self.he.is_secret_key_empty():
            raise SecretKeyError("server context holds a secret key")

    def decrypt(self, *_args, **_kw):
        raise SecretKeyError("the public (server) context has no secret key and cannot decrypt")


class ClientKeys(_HEBase):
    """The client's key set. Holds the secret key: never pass it to server-side code."""

    def __init__(self, config: HEConfig, he: Pyfhel, rotation_steps: tuple[int, ...]):
        self.config, self.he, self.rotation_steps = config, he, rotation_steps
        self.key_id = _key_id(he.to_bytes_public_key("none"))
        self.qi = tuple(int(q) for q in he.get_qi())
        self._neg_s = None  # the plaintext -s, made on the first seeded encryption
        self._neg_s_ntt = None  # -s in NTT form, per prime (the NTT kernel's encryption)
        self._qdt = None  # floor(Q/t) mod q_i (_q_div_t)
        self._decryptor = None  # downloads decrypted on their own primes (decrypt_bytes)

    @classmethod
    def generate(cls, config: HEConfig, rotation_steps=()) -> "ClientKeys":
        steps = _check_steps(config, rotation_steps)
        he = _context(config)
        he.keyGen()
        he.relinKeyGen()
        if steps:
            he.rotateKeyGen(list(steps))
        return cls(config, he, steps)

    def public_context_bytes(self) -> bytes:
        he = self.he
        gk = he.to_bytes_rotate_key("none") if self.rotation_steps else b""
        blobs = [he.to_bytes_context("none"), he.to_bytes_public_key("none"), he.to_bytes_relin_key("none"), gk]
        meta = {"config": self.config.to_dict(), "rotation_steps": list(self.rotation_steps),
                "qi": [int(q) for q in he.get_qi()]}
        return serialize.pack("public_context", self.config.fingerprint, self.key_id, meta,
                              serialize.join_blobs(blobs))

    def public_context(self, giant_steps=()) -> PublicContext:
        """The server's view, rebuilt from bytes so it provably holds no secret key."""
        return PublicContext.from_bytes(self.public_context_bytes(), self.config, giant_steps)

    def secret_key_bytes(self) -> bytes:
        return self.he.to_bytes_secret_key("none")

    def encrypt(self, slots) -> PyCtxt:
        return self.encrypt_public(slots)

    def encrypt_to_bytes(self, slots) -> bytes:
        """An upload: symmetric encryption in the seeded wire form (``wire`` module doc, steps 2-4),
        about 0.44x the bytes of a public-key ciphertext."""
        seed = os.urandom(wire.SEED_BYTES)
        c0 = self._seeded_c0(slots, seed, wire.cbd_noise(self.config.n))
        return serialize.pack("ciphertext", self.config.fingerprint, self.key_id, {"form": "seeded"},
                              wire.seeded_payload(self._ct_template, seed, c0, self.widths))

    def _seeded_c0(self, slots, seed: bytes, e: np.ndarray, kernel: bool = True) -> np.ndarray:
        """c0 = Delta*m - a*s + e (k, n) for ``a = expand_seed(seed)``: with the NTT kernel in one C call
        (``_ntt.seeded_c0``), else through SEAL's add_plain; the same words either way (tests/he/test_wire.py)."""
        self._secret_plain()  # -s and the ciphertext template, made once
        k, n = len(self.widths), self.config.n
        a = wire.expand_seed(seed, self.qi[:k], n)
        pt = self.encode(slots)
        if kernel and ntt.available():
            tb = ntt.tables(n, self.qi[:k], self.config.t)
            if self._neg_s_ntt is None:
                self._neg_s_ntt = ntt.plain_ntt(tb, ntt.plain_coeffs(self._neg_s, n))
            Q, t = math.prod(self.qi[:k]), self.config.t
            c0 = np.empty((k, n), np.uint64)
            ntt._ntt.seeded_c0(c0, a, self._neg_s_ntt, ntt.plain_coeffs(pt, n), np.ascontiguousarray(e, np.int64),
                               self._q_div_t(), tb.tables, tb.qs, tb.ninv, tb.ratios, Q % t, t, k, n)
            return c0
        y = PyCtxt(pyfhel=self.he, bytestring=self._ct_template + np.stack([self._minus_a_s(a), a]).tobytes())
        self.he.add_plain(y, pt)  # c0 = Delta*m - a*s
        c0 = np.frombuffer(y.to_bytes("none"), np.uint64, offset=wire.PREFIX).reshape(2, k, n)[0].copy()
        for i, q in enumerate(self.qi[:k]):
            c0[i] = np.mod(c0[i] + np.mod(e, q).astype(np.uint64), np.uint64(q))
        return c0

    def _q_div_t(self) -> np.ndarray:
        """floor(Q/t) mod q_i for the data primes (SEAL's coeff_div_plain_modulus), made once."""
        if self._qdt is None:
            k = len(self.widths)
            Q = math.prod(self.qi[:k])
            self._qdt = np.array([Q // self.config.t % q for q in self.qi[:k]], np.uint64)
        return self._qdt

    def _minus_a_s(self, a: np.ndarray) -> np.ndarray:
        """-a*s, (k, n) residues: with the NTT kernel one forward and one inverse NTT of a (2k NTTs)
        against -s kept in NTT form, else Pyfhel's multiply_plain (5k NTTs). The same words either
        way (an exact negacyclic product; tests/he/test_wire.py)."""
        neg_s = self._secret_plain()
        k, n = a.shape
        if not ntt.available():
            raw = self._ct_template[:wire.PREFIX] + np.stack([a, a]).tobytes()
            y = self.he.multiply_plain(PyCtxt(pyfhel=self.he, bytestring=raw), neg_s, True)  # (-a*s, -a*s)
            return np.frombuffer(y.to_bytes("none"), np.uint64, offset=wire.PREFIX).reshape(2, k, n)[0].copy()
        tb = ntt.tables(n, self.qi[:k], self.config.t)
        if self._neg_s_ntt is None:
            self._neg_s_ntt = ntt.plain_ntt(tb, ntt.plain_coeffs(neg_s, n))  # (k, n): -s lifted to each q_i
        a_ntt = ntt.forward(tb, a[None].copy())[None]  # (1, 1, k, n)
        return ntt.inverse(tb, ntt.mac(tb, a_ntt, self._neg_s_ntt[None], np.zeros(1, np.int64)))[0]

    def _secret_plain(self) -> PyPtxt:
        """The plaintext -s (wire module doc, step 1): decrypt (0, floor(Q/t)), whose phase is floor(Q/t)*s."""
        if self._neg_s is None:
            raw = self.encrypt_public(np.zeros(self.config.n, np.int64)).to_bytes("none")
            k, n, t = len(self.widths), self.config.n, self.config.t
            delta = math.prod(self.qi[:k]) // t
            words = np.zeros((2, k, n), np.uint64)
            words[1, :, 0] = [delta % q for q in self.qi[:k]]
            plain = self.he.decrypt(PyCtxt(pyfhel=self.he, bytestring=raw[:wire.PREFIX] + words.tobytes()),
                                    decode=False).to_bytes("none")
            coeffs = np.zeros(n, np.uint64)  # SEAL drops trailing zero coefficients
            got = np.frombuffer(plain, np.uint64, offset=wire.PLAIN_PREFIX)
            coeffs[:got.size] = got
            if not np.all((coeffs <= 1) | (coeffs == t - 1)):
                raise SecretKeyError("the secret key is not ternary: seeded encryption needs SEAL's key distribution")
            neg = np.where(coeffs == 0, 0, t - coeffs.astype(np.int64)).astype(np.uint64)  # -s mod t
            proto = self.encode(np.zeros(n, np.int64)).to_bytes("none")
            if len(proto) != wire.PLAIN_PREFIX + 8 * n:
                raise SerializationError("SEAL plaintext layout differs from the one seeded encryption expects")
            self._ct_template = raw[:wire.PREFIX]
            self._neg_s = PyPtxt(pyfhel=self.he, bytestring=proto[:wire.PLAIN_PREFIX] + neg.tobytes())
        return self._neg_s

    def decrypt(self, ct: PyCtxt) -> np.ndarray:
        """Slots of ``ct`` as field elements in [0, t)."""
        return np.mod(np.asarray(self.he.decryptInt(ct), np.int64), self.config.t)

    def decrypt_bytes(self, data: bytes) -> np.ndarray:
        """``decrypt(ct_from_bytes(data))``; a download (switched form) on its own primes with the NTT
        kernel (he/decrypt.py: the same slots, without lifting it back to every data prime)."""
        form, payload, head = self._wire_head(data)
        if form != "switched" or not ntt.available() or self.switch_keep > 2:
            return self.decrypt(self.ct_from_bytes(data))
        low = wire.switched_words(payload, head, self.widths, self.qi, self.switch_keep)
        if self._decryptor is None:
            neg = ntt.plain_coeffs(self._secret_plain(), self.config.n)
            self._decryptor = SwitchedDecryptor(self.config.n, self.config.t, self.qi[:self.switch_keep], neg)
        return self._decryptor(low)

    def noise_budget(self, ct: PyCtxt) -> int:
        """Measured invariant noise budget in bits (needs the secret key)."""
        return int(self.he.noise_level(ct))

    def to_bytes(self) -> bytes:
        """Full key set incl. secret key, for the client's own checkpoint only."""
        he = self.he
        gk = he.to_bytes_rotate_key("none") if self.rotation_steps else b""
        blobs = [he.to_bytes_context("none"), he.to_bytes_public_key("none"), he.to_bytes_relin_key("none"), gk,
                 he.to_bytes_secret_key("none")]
        meta = {"config": self.config.to_dict(), "rotation_steps": list(self.rotation_steps)}
        return serialize.pack("client_keys", self.config.fingerprint, self.key_id, meta, serialize.join_blobs(blobs))

    @classmethod
    def from_bytes(cls, data: bytes) -> "ClientKeys":
        meta, payload, _, kid = serialize.unpack(data, "client_keys")
        config = HEConfig.from_dict(meta["config"])
        ctx_b, pk_b, rk_b, gk_b, sk_b = serialize.split_blobs(payload)
        he = Pyfhel()
        he.from_bytes_context(ctx_b)
        he.from_bytes_public_key(pk_b)
        he.from_bytes_relin_key(rk_b)
        if gk_b:
            he.from_bytes_rotate_key(gk_b)
        he.from_bytes_secret_key(sk_b)
        keys = cls(config, he, tuple(meta["rotation_steps"]))
        if keys.key_id != kid:
            raise SerializationError("client key set does not match its key id")
        return keys
