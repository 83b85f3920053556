"""The client's decryption of a download on its own primes (he/decrypt.py, _ntt.decrypt_round) against
references: Python-integer phase and rounding at a small ring, SEAL's batch decoding, and SEAL's own
decryption of the same downloads (lifted back to every data prime)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from Pyfhel import PyPtxt

from cryptogen.field import random_elements
from cryptogen.he import ntt, wire
from cryptogen.he.decrypt import SwitchedDecryptor, batch_decode

# n = 16: NTT primes 97, 1153 and SEAL's 54-bit one (each 1 mod 32)
N16, PRIMES = 16, (97, 1153, 18014398507220993)


def _negacyclic(a: list[int], b: list[int], q: int) -> list[int]:
    n, out = len(a), [0] * len(a)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            k = i + j
            out[k % n] = (out[k % n] + (x * y if k < n else -x * y)) % q
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_decrypt_round_is_the_exact_rounded_phase(data):
    """m = round(t (c0 + c1 s mod Q') / Q') mod t with Q' one or two primes, for any words, any ternary
    s and t, including the rounding boundaries (phase at Q'/(2t) multiples) and words q - 1."""
    keep = data.draw(st.sampled_from([1, 2]))
    primes = data.draw(st.sampled_from([PRIMES[:2], PRIMES[1:], PRIMES[::2]]))[:keep]
    t = data.draw(st.sampled_from([2, 3, 17, 97, 65537]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    s = rng.integers(-1, 2, N16)
    c = np.stack([np.stack([rng.integers(0, q, N16, dtype=np.uint64) for q in primes]) for _ in range(2)])
    if data.draw(st.booleans()):
        c[:, :, 0] = np.array(primes, np.uint64) - np.uint64(1)
    big = int(np.prod([int(q) for q in primes], dtype=object))
    tb = ntt.tables(N16, primes, t)
    # its -s and CRT factors (its batch decoding needs an NTT-friendly t: the kernel is called with t here)
    dec = SwitchedDecryptor(N16, 3, primes, np.where(-s < 0, 2, -s).astype(np.uint64))  # -s mod 3
    x = []
    for j in range(N16):  # the phase by the CRT of each prime's c0 + c1 s
        res = [(int(c[0, i, j]) + _negacyclic([int(v) for v in c[1, i]], [int(v) for v in s], q)[j]) % q
               for i, q in enumerate(primes)]
        x.append(sum(r * (big // q) * pow(big // q, -1, q) for r, q in zip(res, primes)) % big)
    if data.draw(st.booleans()):  # shift c0 so that coefficient 1's phase sits on a rounding boundary
        want = (big * (2 * int(rng.integers(0, t)) + 1) + 2 * t - 1) // (2 * t)  # ceil(Q'(2k+1)/(2t))
        d = (want - x[1]) % big
        for i, q in enumerate(primes):
            c[0, i, 1] = (int(c[0, i, 1]) + d) % q
        x[1] = want
    m = np.empty(N16, np.uint64)
    ntt._ntt.decrypt_round(m, np.ascontiguousarray(c), dec.neg_s, tb.tables, tb.qs, tb.ninv, tb.ratios, dec.yhat,
                           t, keep, N16)
    assert [int(v) for v in m] == [(2 * t * xj + big) // (2 * big) % t for xj in x]


def test_batch_decode_is_seals(keys, cfg):
    """Slots from plaintext coefficients (the extremes 0, 1, t - 1 among them) as Pyfhel's decodeInt."""
    rng = np.random.default_rng(3)
    coeffs = rng.integers(0, cfg.t, cfg.n).astype(np.uint64)
    coeffs[:3] = (0, 1, cfg.t - 1)
    proto = keys.encode(np.zeros(cfg.n, np.int64)).to_bytes("none")
    pt = PyPtxt(pyfhel=keys.he, bytestring=proto[:wire.PLAIN_PREFIX] + coeffs.tobytes())
    want = np.mod(np.asarray(keys.he.decodeInt(pt), np.int64), cfg.t)
    assert np.array_equal(batch_decode(coeffs, cfg.t), want)


@pytest.mark.parametrize("bits", [0, 20, 42])
def test_downloads_decrypt_to_seals_slots(keys, cfg, engine, client, bits):
    """Exports (fresh, and after a ct x pt by a plaintext of 20 or 42 bits: budgets from fresh to
    ~100 bits) decrypted on their own primes equal SEAL's decryption of the same bytes lifted back, and
    the plaintext."""
    x = random_elements(cfg.n, cfg.t, np.random.default_rng(bits))
    x[:2] = (0, cfg.t - 1)
    c = engine.receive(client.s2h_send(x))
    want = x.copy()
    if bits:
        w = np.random.default_rng(10 + bits).integers(0, min(1 << bits, cfg.t), cfg.n)
        c = engine.mul_ct_pt(c, engine.encode(w))
        want = np.mod(want.astype(object) * w.astype(object), cfg.t).astype(np.int64)
    for _ in range(2):
        data = engine.export(c)
        got = keys.decrypt_bytes(data)
        assert np.array_equal(got, keys.decrypt(keys.ct_from_bytes(data)))
        assert np.array_equal(got, want)
