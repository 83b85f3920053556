"""Server-side ciphertext evaluator with op counting and worst-case noise tracking.

Construction: SEAL BFV evaluation (Pyfhel); circuit privacy by re-randomisation and
noise flooding before a ciphertext leaves the server (Gentry's flooding; as used by
Gazelle/Cheetah-style 2PC+HE), see :meth:`ServerEngine.export` and :mod:`cryptogen.he.noise`.

Steps of ``export`` (server -> client):
  1. refuse if this key already exported 2^X ciphertexts (X = ``max_exports_log2``;
     per key id, per process) -- the flooding below is sized for that many;
  2. check the proven budget b leaves room for flooding (else NoiseBudgetError);
  3. add a fresh public-key encryption of zero (c1 becomes freshly random): ours, at the data level
     (``_enc_zero``: the public key's data-prime rows, u ternary, SEAL's CBD error; noise rule 1b);
  4. add to c0 a polynomial F with i.i.d. coefficients floor(U1 + U2 + U3) - 3A/2, U_i uniform on
     [0, A), A = 2^a, a = ceil(sigma + (X + log2 n)/2 + 0.1 + log2 E), E = (q/t) 2^-(b+1) >= the
     evaluation noise (b is a worst-case lower bound). By the Hellinger argument of noise.py
     (steps 6-8) all 2^X exports of a key together are within statistical distance 2^-sigma
     (sigma = 40) of exports whose noise is independent of the server's weights and shares.
Who learns what: the client later decrypts Enc(x - r) only (see convert.py).
Cost: per export one encryption of zero (k forward and 2k inverse NTTs, 6-7 ms at N = 16384, against
~8 ms for SEAL's at the key level; made ahead on a helper thread: he/enczero.py) and a few passes over
c0's RNS words.
Every method is callable with a :class:`PublicContext` only; the noise model uses the primes
read from the loaded SEAL context (``ctx.qi``).
"""
from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from Pyfhel import PyCtxt

from ..field import random_bytes
from . import ctct, enczero, ntt, threads
from .errors import HEError, SecretKeyError, SerializationError, ShapeError
from .keys import ClientKeys, PublicContext
from . import noise as noise_mod
from .noise import NoiseModel
from .stats import HEStats
from .serialize import public_key_words
from .wire import mulmod_scalar


@dataclass
class Cipher:
    """A server-held ciphertext and its static noise-budget estimate (bits)."""

    ct: PyCtxt
    budget: float
    # (ctct basis, the ciphertext extended and NTT'd: he/ctct.py step 1) once a product made it with
    # keep; valid for the Cipher's life (a ciphertext is never changed in place: writes make new ones)
    prepared: tuple | None = field(default=None, repr=False, compare=False)


class ExportLimitError(HEError, RuntimeError):
    """A key has exported as many ciphertexts as its flooding was sized for."""


_EXPORTS: dict[bytes, int] = {}  # key id -> ciphertexts exported under it (this process)
_EXPORTS_LOCK = threading.Lock()


def exports_of(key_id: bytes) -> int:
    with _EXPORTS_LOCK:
        return _EXPORTS.get(key_id, 0)


def restore_exports(key_id: bytes, at_least: int) -> int:
    """After a worker restart: this process counts the key's exports from at least ``at_least``
    (a checkpoint's count), so a restart never resets the flooding budget. Returns the count."""
    with _EXPORTS_LOCK:
        _EXPORTS[key_id] = max(_EXPORTS.get(key_id, 0), int(at_least))
        return _EXPORTS[key_id]


def add_exports(key_id: bytes, extra: int) -> None:
    """Count ``extra`` exports made elsewhere (the lost attempt of a step redone after a restart)."""
    with _EXPORTS_LOCK:
        _EXPORTS[key_id] = _EXPORTS.get(key_id, 0) + max(0, int(extra))


def _random_bytes(nbytes: int) -> bytearray:
    """A CSPRNG stream (``field.random_bytes``: AES-256-CTR under a fresh 32-byte os.urandom key),
    ~10x faster here than os.urandom for the flood's megabyte per export. A name of its own so
    tests can replace the stream."""
    return random_bytes(nbytes)


def _uniform_limbs(bits: int, n: int) -> np.ndarray:
    """(limbs, n) uint64 60-bit limbs of n integers uniform in [0, 2^bits)."""
    nlimb = (bits + 59) // 60
    limbs = np.frombuffer(_random_bytes(8 * n * nlimb), dtype=np.uint64).reshape(nlimb, n).copy()
    limbs &= np.uint64((1 << 60) - 1)
    limbs[-1] &= np.uint64((1 << (bits - 60 * (nlimb - 1))) - 1)
    return limbs


def _irwin_hall_j(n: int) -> np.ndarray:
    """J in {0, 1, 2} with probabilities 1/6, 2/3, 1/6 (= floor of a sum of 3 uniform fractions),
    exactly: bytes below 252 = 6 * 42 kept, r = byte mod 6 uniform on {0..5}; J = 0 if r == 0, 2 if
    r == 5, else 1."""
    out, have = np.empty(n, np.uint64), 0
    while have < n:
        b = np.frombuffer(_random_bytes(n - have + 64), dtype=np.uint8)
        r = b[b < 252][:n - have] % 6
        out[have:have + r.size] = (r != 0).astype(np.uint64) + (r == 5)
        have += r.size
    return out


def _flood_residues(a: int, n: int, moduli: list[int]) -> np.ndarray:
    """Residues mod each q_i of F = K1 + K2 + K3 + J - 3 * 2^(a-1) (noise.py rule 6)."""
    s = _uniform_limbs(a, n) + _uniform_limbs(a, n) + _uniform_limbs(a, n)  # limb sums < 2^62
    j = _irwin_hall_j(n)
    out = np.empty((len(moduli), n), dtype=np.uint64)
    for i, q in enumerate(moduli):
        qq = np.uint64(q)
        acc = np.mod(j, qq)
        for k in range(s.shape[0]):
            limb = np.mod(s[k], qq)
            acc = np.mod(acc + (mulmod_scalar(limb, 1 << (60 * k), q) if k else limb), qq)
        off = (3 << (a - 1)) % q  # center
        out[i] = np.mod(acc + np.uint64(q - off), qq)
    return out


def _flood_into(c0: np.ndarray, a: int, moduli: list[int]) -> None:
    """c0 (k, n) += _flood_residues(a, n, moduli), the same draws, in one C call (``_ntt.flood_add``)."""
    k, n = c0.shape
    limbs = np.concatenate([_uniform_limbs(a, n) for _ in range(3)])  # (3 * nlimb, n)
    j = _irwin_hall_j(n)
    nlimb = limbs.shape[0] // 3
    ntt._ntt.flood_add(c0, limbs, j, *_flood_constants(a, tuple(int(q) for q in moduli)), k, nlimb, n)


@lru_cache(maxsize=64)
def _flood_constants(a: int, qs: tuple[int, ...]) -> tuple:
    """flood_add's public constants: 2^(60 l) mod q_i, 3 * 2^(a-1) mod q_i, the primes, their Barrett ratios."""
    nlimb = (a + 59) // 60
    return (np.array([[(1 << 60 * m) % q for m in range(nlimb)] for q in qs], np.uint64),
            np.array([(3 << (a - 1)) % q for q in qs], np.uint64), np.array(qs, np.uint64), ntt.barrett_ratios(qs))


class ServerEngine:
    """Evaluates on ciphertexts for the server; accepts only a :class:`PublicContext`."""

    def __init__(self, ctx: PublicContext, stats: HEStats | None = None, export_share: int = 1):
        """``export_share``: how many processes export under this key (the workers of a session):
        each may use 1/export_share of the key's 2^max_exports_log2 exports, so the key's whole
        transcript stays within the budget its flooding was sized for."""
        if isinstance(ctx, ClientKeys) or not isinstance(ctx, PublicContext):
            raise SecretKeyError("server-side code must be built from a PublicContext, not client keys")
        ctx.assert_public()
        self.ctx, self.config = ctx, ctx.config
        self.stats = stats if stats is not None else HEStats()
        self.noise = NoiseModel(ctx.config, tuple(ctx.qi))
        self._qi = list(ctx.qi)
        self._pk_ntt: dict = {}  # k -> the public key's words over the first k primes, NTT form (``_enc_zero``)
        self._zeros = enczero.ZeroPool(self._make_enc_zero)
        self.max_exports = (1 << ctx.config.max_exports_log2) // max(1, int(export_share))
        # keep the cache ciphertexts' NTT forms for the attention (1.5x their bytes with their shares'
        # plaintexts: kvcache.EncryptedKVCache.forms) and ct x ct preparations (2.25x, he/ctct.py "Memory")
        self.keep_prepared = True

    # ---- encoding / transport -------------------------------------------------
    def encode(self, slots):
        return self.ctx.encode(slots)

    def encrypt(self, slots) -> Cipher:
        """Server-side public-key encryption (e.g. of its own share)."""
        self.stats.encryptions += 1
        return Cipher(self.ctx.encrypt_public(slots), self.noise.fresh_encryption)

    def receive(self, data: bytes) -> Cipher:
        """A fresh ciphertext sent by the client (S2H input, refresh)."""
        ct = self.ctx.ct_from_bytes(data)
        if ct.size() != 2:
            raise ShapeError("client ciphertexts must have 2 polynomials")
        self.stats.record_to_server(len(data))
        return Cipher(ct, self.noise.fresh_encryption)

    def _count_export(self) -> None:
        kid = self.ctx.key_id
        with _EXPORTS_LOCK:
            done = _EXPORTS.get(kid, 0)
            if done >= self.max_exports:
                raise ExportLimitError(
                    f"this key has exported {done} ciphertexts here, its share of the 2^{self.config.max_exports_log2} "
                    f"its noise flooding is sized for; reconnect to make new keys")
            _EXPORTS[kid] = done + 1

    @property
    def exports_left(self) -> int:
        return self.max_exports - exports_of(self.ctx.key_id)

    def export(self, c: Cipher, what: str = "ciphertext") -> bytes:
        """Re-randomise + flood ``c`` (see module doc) and serialize it for the client."""
        ct = c.ct
        # a 3-polynomial product (``mul_ct_ct(.., relin=False)``, or a sum of them) is relinearised
        # here; its budget already counts that key switch (noise rule 5 includes it)
        budget = c.budget
        self.noise.require_sendable(budget, what)
        self._count_export()
        if ct.size() != 2:
            ct = self.ctx.he.relinearize(ct) or ct
        raw, words = self._flood(ct, budget)  # adds Enc_pk(0) first (``_enc_zero``)
        self.stats.rerandomizations += 1
        data = self.ctx.words_to_bytes(raw, words, "switched")  # fewer primes on the wire: after the flood
        self.stats.record_to_client(len(data))
        return data

    def flood_bits(self, budget: float) -> int:
        """a: the flood's coefficients span 3 * 2^a (noise.py rules 6-8)."""
        log_e = math.log2(self.config.t) - self.noise.lq
        log_e = math.log2(2.0 ** (-budget - 1) + 2.0 ** (-self.noise.enc_zero - 1)) - log_e  # log2 E
        bits = self.config.flood_sigma + math.log2(self.config.n) / 2 + self.config.max_exports_log2 / 2
        return int(math.ceil(bits + noise_mod.TV_CONST + log_e))

    def _flood(self, ct: PyCtxt, budget: float) -> tuple[bytes, np.ndarray]:
        """(``ct``'s SEAL bytes, its words (2, k, n) re-randomised and flooded): steps 3-4."""
        raw = ct.to_bytes("none")
        n = self.config.n
        (size, degree, k) = struct.unpack_from("<QQQ", raw, 16 + 32 + 1)
        if degree != n or size != 2 or k > len(self._qi):
            raise SerializationError("unexpected SEAL ciphertext layout")
        data_len = size * k * n * 8
        data = np.frombuffer(raw[-data_len:], dtype=np.uint64).reshape(size, k, n).copy()
        if ntt.available():
            data += self._enc_zero(k)
            qs = self._qs_col(k)
            np.subtract(data, qs, out=data, where=data >= qs)
            _flood_into(data[0], self.flood_bits(budget), self._qi[:k])
        else:  # no kernel: SEAL's Enc(0) at the key level (noise rule 1 <= rule 1b's bound)
            zero = self.ctx.encrypt_public(np.zeros(n, np.int64)).to_bytes("none")
            zw = np.frombuffer(zero[-data_len:], dtype=np.uint64).reshape(size, k, n)
            for i in range(k):
                data[:, i] = np.mod(data[:, i] + zw[:, i], np.uint64(self._qi[i]))
            noise = _flood_residues(self.flood_bits(budget), n, self._qi[:k])
            for i in range(k):
                q = np.uint64(self._qi[i])
                data[0, i] = np.mod(data[0, i] + noise[i], q)
        return raw, data

    def _qs_col(self, k: int) -> np.ndarray:
        return np.array(self._qi[:k], np.uint64)[None, :, None]

    def _enc_zero(self, k: int) -> np.ndarray:
        """Enc_pk(0) over the first k (data) primes, (2, k, n) coefficient-form words (he/enczero.py:
        made ahead on a helper thread; the public key's rows of those primes in NTT form, its special
        prime dropped: (pk0, pk1) mod Q is an RLWE public key mod Q). k forward and 2k inverse NTTs,
        6-7 ms at N = 16384 (SEAL's encrypt_zero works at the key level and divides by the special
        prime: twice the NTTs). Noise: noise.py rule 1b."""
        if k not in self._pk_ntt:
            words = public_key_words(self.ctx.he.to_bytes_public_key("none"), self.config.n, len(self._qi))
            self._pk_ntt[k] = np.ascontiguousarray(words[None, :, :k])
        return self._zeros.take(k)

    def _make_enc_zero(self, k: int) -> np.ndarray:
        return enczero.enc_zero(ntt.tables(self.config.n, tuple(self._qi[:k]), self.config.t), self._pk_ntt[k])

    # ---- arithmetic -----------------------------------------------------------
    def mul_ct_pt(self, c: Cipher, pt) -> Cipher:
        self.stats.ct_pt_mul += 1
        return Cipher(self.ctx.he.multiply_plain(c.ct, pt, True), self.noise.after_ct_pt(c.budget))

    def mul_ct_ct(self, a: Cipher, b: Cipher, relin: bool = True) -> Cipher:
        """a * b; ``relin=False`` leaves the 3-polynomial product for a sum that ``export``
        relinearises once (the budget counts one relinearisation either way: noise rule 5)."""
        self.stats.ct_ct_mul += 1
        ct = self.ctx.he.multiply(a.ct, b.ct, True)
        if relin:
            self.ctx.he.relinearize(ct)
        return Cipher(ct, self.noise.after_ct_ct(a.budget, b.budget))

    def _ctct_operands(self, cs: list[Cipher], keep: list[bool]):
        """(ctct's basis, a SEAL prefix at their level, each one prepared: he/ctct.py step 1), or None
        where SEAL multiplies instead (no kernel, or not all of them 2-polynomial ciphertexts at one
        level below the key's). ``keep[i]``: leave cs[i]'s preparation on it for later products."""
        if not ctct.available() or any(c.ct.size() != 2 for c in cs):
            return None
        basis, prefix, out = None, None, []
        for c, kp in zip(cs, keep):
            if c.prepared is not None and (basis is None or c.prepared[0] is basis):
                basis = c.prepared[0]
                out.append(c.prepared[1])
                continue
            pre, words = ntt.ct_words(c.ct)
            k = words.shape[1]
            if not 1 <= k < len(self._qi):
                return None
            b = ctct.basis(self.config.n, tuple(self._qi[:k]), self.config.t, tuple(self._qi[k:]))
            if basis is not None and b is not basis:
                return None
            basis, prefix = b, prefix or pre
            arr = ctct.prepare(b, words)
            if kp:
                c.prepared = (b, arr)
            out.append(arr)
        return basis, prefix or ntt.ct_words(cs[0].ct)[0], out

    def mul_ct_ct_many(self, a: Cipher, bs: list[Cipher]) -> list[Cipher]:
        """[a * b for b in bs], relinearised; ``a`` prepared once for all of them (he/ctct.py)."""
        got = self._ctct_operands([a, *bs], [False] + [self.keep_prepared] * len(bs))
        if got is None:
            return [self.mul_ct_ct(a, b) for b in bs]
        basis, prefix, prep = got
        out = []
        for b, right in zip(bs, prep[1:]):
            self.stats.ct_ct_mul += 1
            ct = ntt.ct_from_words(self.ctx.he, prefix, ctct.product(basis, [prep[0]], [right]))
            self.ctx.he.relinearize(ct)
            out.append(Cipher(ct, self.noise.after_ct_ct(a.budget, b.budget)))
        return out

    def dot_ct_ct(self, as_: list[Cipher], bs: list[Cipher]) -> Cipher:
        """sum_c as_[c] * bs[c], not relinearised (``export`` does it once): the products summed before
        the one scaling (he/ctct.py step 3). The budget counts one relinearisation (noise rule 5)."""
        if not as_ or len(as_) != len(bs):
            raise ShapeError(f"a dot product of ciphertexts needs equal non-empty lists, got {len(as_)} and {len(bs)}")
        got = None if len(as_) > ctct.MAX_PAIRS else self._ctct_operands(
            [*as_, *bs], [False] * len(as_) + [self.keep_prepared] * len(bs))
        if got is None:
            return self.sum([self.mul_ct_ct(a, b, relin=False) for a, b in zip(as_, bs)])
        basis, prefix, prep = got
        out = ctct.product(basis, prep[:len(as_)], prep[len(as_):])
        self.stats.ct_ct_mul += len(as_)
        self.stats.additions += len(as_) - 1
        budget = self.noise.add(*[self.noise.after_ct_ct(a.budget, b.budget) for a, b in zip(as_, bs)])
        return Cipher(ntt.ct_from_words(self.ctx.he, prefix, out), budget)

    # ---- ct x pt sums in the NTT domain (he/ntt.py; the attention's cross terms, he/arcc.py) ------
    def ct_form(self, c: Cipher) -> np.ndarray | None:
        """c's (2, k, n) words in NTT form (2k NTTs), or None without the kernel or for a 3-polynomial c."""
        if not ntt.available() or c.ct.size() != 2:
            return None
        words = np.array(ntt.ct_words(c.ct)[1])
        return ntt.forward(ntt.tables(self.config.n, tuple(self._qi[:words.shape[1]]), self.config.t), words)

    def pt_form(self, slots, k: int) -> np.ndarray | None:
        """The plaintext of ``slots`` in NTT form over the first k primes (k NTTs), or None without the kernel."""
        if not ntt.available():
            return None
        tb = ntt.tables(self.config.n, tuple(self._qi[:k]), self.config.t)
        return ntt.plain_ntt(tb, ntt.plain_coeffs(self.encode(slots), self.config.n))

    def dot_ct_pt(self, terms: list[tuple], count: bool = True) -> Cipher:
        """sum_i c_i * pt(slots_i) for terms (c_i, slots_i, c_i's ``ct_form`` or None, the slots'
        ``pt_form`` or None): with the kernel one multiply-accumulate per HE thread over its part of
        the terms (he/threads.py), the parts summed, and 2k inverse NTTs (forms not given are made
        here), else SEAL's multiply_plain per term. Word for word SEAL's sum either way.
        ``count=False``: the caller counts the ops (``count_dot``; calls on the HE threads)."""
        if not terms:
            raise ShapeError("a sum of ct x pt products needs at least one term")
        if count:
            self.count_dot(len(terms))
        budget = self.noise.add(*[self.noise.after_ct_pt(c.budget) for c, *_ in terms])
        made = threads.map_tasks(lambda c: self.ct_form(c), [c for c, _, cf, _ in terms if cf is None])[::-1]
        forms = [cf if cf is not None else made.pop() for c, _, cf, _ in terms]
        ks = {f.shape[1] for f in forms if f is not None}
        if any(f is None for f in forms) or len(ks) != 1:
            ct = None
            for c, s, *_ in terms:
                part = self.ctx.he.multiply_plain(c.ct, self.encode(s), True)
                ct = part if ct is None else ct + part
            return Cipher(ct, budget)
        (k,) = ks
        tb = ntt.tables(self.config.n, tuple(self._qi[:k]), self.config.t)
        made = threads.map_tasks(lambda s: self.pt_form(s, k), [s for _, s, _, pf in terms if pf is None])[::-1]
        pts = [pf if pf is not None else made.pop() for _, s, _, pf in terms]

        def part(r: range) -> np.ndarray:
            return ntt.mac(tb, np.stack(forms[r.start:r.stop]), np.stack(pts[r.start:r.stop]), np.arange(len(r)))
        sums = threads.map_tasks(part, threads.halves(len(terms)) if len(terms) >= 8 else [range(len(terms))])
        out = sums[0]
        qs = tb.qs[:, None]
        for extra in sums[1:]:
            out += extra
            np.subtract(out, qs, out=out, where=out >= qs)
        out = ntt.inverse(tb, out)
        return Cipher(ntt.ct_from_words(self.ctx.he, ntt.ct_words(terms[0][0].ct)[0], out), budget)

    def count_dot(self, terms: int) -> None:
        self.stats.ct_pt_mul += terms
        self.stats.additions += terms - 1

    def add_ct_ct(self, a: Cipher, b: Cipher) -> Cipher:
        self.stats.additions += 1
        return Cipher(a.ct + b.ct, self.noise.add(a.budget, b.budget))

    def add_ct_pt(self, c: Cipher, slots) -> Cipher:
        self.stats.additions += 1
        return Cipher(self.ctx.he.add_plain(c.ct, self.encode(slots), True), self.noise.after_add_plain(c.budget))

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
