"""ct x ct by hand (he/ctct.py, _ctct.c) against references: Python-integer round(t/Q * sum of tensor
products) of the centred operands, word for word; and SEAL's multiply (same decryption, noise within a
bit) through the engine's mul_ct_ct_many / dot_ct_ct."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.he import ctct, ntt
from cryptogen.he.engine import Cipher

# small rings: data primes of several widths (SEAL's 54-bit one among them), t ~ 2^42 like ours
RINGS = [(16, (97, 1153, 18014398507220993), 4398044938241),
         (32, (18014398507220993, 1152921504606748673), 4398044938241),
         (8, (17, 97, 113, 193, 241), 65537)]


def _centred(words: np.ndarray, qs) -> list[int]:
    """(L, n) residues -> the n integers in [-Q/2, Q/2) (CRT)."""
    Q = int(np.prod([int(q) for q in qs], dtype=object))
    out = []
    for j in range(words.shape[1]):
        v = sum(int(words[i, j]) * (Q // q) * pow(Q // q, -1, q) for i, q in enumerate(qs)) % Q
        out.append(v - Q if v >= (Q + 1) // 2 else v)
    return out


def _negacyclic(u: list[int], v: list[int]) -> list[int]:
    n, out = len(u), [0] * len(u)
    for i, a in enumerate(u):
        for j, b in enumerate(v):
            k = i + j
            out[k % n] += a * b if k < n else -a * b
    return out


def _reference(pairs, qs, t: int) -> np.ndarray:
    """round(t/Q * sum_c a_c (x) b_c) mod each q_i, with Python integers."""
    Q = int(np.prod([int(q) for q in qs], dtype=object))
    acc = None
    for a, b in pairs:
        a0, a1, b0, b1 = (_centred(x, qs) for x in (a[0], a[1], b[0], b[1]))
        m = _negacyclic(a0, b1)
        terms = [_negacyclic(a0, b0), [x + y for x, y in zip(m, _negacyclic(a1, b0))], _negacyclic(a1, b1)]
        acc = terms if acc is None else [[x + y for x, y in zip(s, d)] for s, d in zip(acc, terms)]
    rounded = [[(2 * t * x + Q) // (2 * Q) for x in poly] for poly in acc]
    return np.array([[[x % q for x in poly] for q in qs] for poly in rounded], np.uint64)


def _operand(rng, qs, n, kind: str) -> np.ndarray:
    """(2, L, n) residues: uniform, or every coefficient near the centred lift's ends, +-Q/2 (2^-40 Q
    inside them: within 2^-62 Q of them the lift may be a + Q, harmless: he/ctct.py step 1), or -1, 0."""
    Q = int(np.prod([int(q) for q in qs], dtype=object))
    if kind == "uniform":
        return np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in qs]) for _ in range(2)])
    top = Q // 2 - (Q >> 40) - 1
    vals = {"edge": [top, Q - top, Q - 1, 0, 1], "top": [top]}[kind]
    ints = [vals[j % len(vals)] for j in range(n)]
    return np.stack([np.array([[x % q for x in ints] for q in qs], np.uint64)] * 2)


def test_kernel_is_built():
    """bin/bootstrap builds cryptogen/he/_ctct.c (its absence would silently fall back to SEAL)."""
    assert ctct.available()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_product_is_rounded_scaled_tensor(data):
    """Any ring of RINGS, 1-3 summed pairs, uniform or extreme operands: exactly the integer reference."""
    n, qs, t = data.draw(st.sampled_from(RINGS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kinds = data.draw(st.lists(st.sampled_from(["uniform", "edge", "top"]), min_size=2, max_size=6))
    pairs = [(_operand(rng, qs, n, kinds[i]), _operand(rng, qs, n, kinds[i + 1])) for i in range(0, len(kinds) - 1, 2)]
    b = ctct.basis(n, qs, t)
    got = ctct.product(b, [ctct.prepare(b, x) for x, _ in pairs], [ctct.prepare(b, y) for _, y in pairs])
    assert np.array_equal(got, _reference(pairs, qs, t))


def test_most_pairs_at_the_extreme_fit():
    """MAX_PAIRS products of operands at the largest centred magnitude: the 128-bit sums and the
    auxiliary base still hold the exact result."""
    n, qs, t = RINGS[0]
    rng = np.random.default_rng(0)
    x = _operand(rng, qs, n, "top")
    b = ctct.basis(n, qs, t)
    px = ctct.prepare(b, x)
    got = ctct.product(b, [px] * ctct.MAX_PAIRS, [px] * ctct.MAX_PAIRS)
    one = _reference([(x, x)], qs, t)
    Q = int(np.prod([int(q) for q in qs], dtype=object))
    want_ints = [[(2 * t * ctct.MAX_PAIRS * c + Q) // (2 * Q) for c in poly] for poly in
                 [_unscaled(x, qs)[d] for d in range(3)]]
    want = np.array([[[v % q for v in poly] for q in qs] for poly in want_ints], np.uint64)
    assert np.array_equal(got, want) and one.shape == got.shape
    with pytest.raises(ValueError, match="pairs"):
        ctct.product(b, [px] * (ctct.MAX_PAIRS + 1), [px] * (ctct.MAX_PAIRS + 1))


def _unscaled(x, qs):
    a0, a1 = _centred(x[0], qs), _centred(x[1], qs)
    m = _negacyclic(a0, a1)
    return [_negacyclic(a0, a0), [2 * v for v in m], _negacyclic(a1, a1)]


def test_kernels_refuse_mis_sized_buffers():
    n, qs, t = RINGS[0]
    b = ctct.basis(n, qs, t)
    with pytest.raises(ValueError, match="ciphertext of 2 primes"):
        ctct.prepare(b, np.zeros((2, 2, n), np.uint64))
    with pytest.raises(ValueError, match="HE kernel: operand has"):
        ctct._ctct.tensor(np.empty((3, b.L + b.K, n), np.uint64), [np.zeros(3, np.uint64)],
                          [np.zeros(3, np.uint64)], b.tb.qs, b.tb.ratios, b.L + b.K, n)
    with pytest.raises(ValueError, match="HE kernel: input has"):
        ctct._ctct.scale(np.empty((3, b.L, n), np.uint64), np.zeros(5, np.uint64), *b.sc, 3, b.L, b.K, n)


def test_engine_products_decrypt_as_seals(keys, engine, cfg):
    """At the real parameters: q * K_c for several c and sum_c p_c * V_c decrypt to SEAL's, with a
    measured noise budget within a bit of SEAL's; the cache operands keep their preparation."""
    rng = np.random.default_rng(3)
    t = cfg.t
    enc = lambda v: Cipher(keys.encrypt(v), engine.noise.fresh_encryption)  # noqa: E731
    q, ks = rng.integers(0, t, cfg.n), [rng.integers(0, t, cfg.n) for _ in range(3)]
    cq, cks = enc(q), [enc(k) for k in ks]
    mine = engine.mul_ct_ct_many(cq, cks)
    assert all(c.prepared is not None for c in cks)
    for m, ck, k in zip(mine, cks, ks):
        seal = engine.mul_ct_ct(cq, ck)
        want = (q.astype(object) * k.astype(object) % t).astype(np.int64)
        assert m.ct.size() == 2 and np.array_equal(np.asarray(keys.decrypt(m.ct)), want)
        assert keys.noise_budget(m.ct) >= keys.noise_budget(seal.ct) - 1
        assert m.budget == seal.budget
    again = engine.mul_ct_ct_many(cq, cks)  # from the kept preparations: the same words
    assert all(a.ct.to_bytes("none") == m.ct.to_bytes("none") for a, m in zip(again, mine))
    ps = [rng.integers(0, t, cfg.n) for _ in range(3)]
    dot = engine.dot_ct_ct([enc(p) for p in ps], cks)
    want = sum(p.astype(object) * k.astype(object) for p, k in zip(ps, ks)) % t
    assert dot.ct.size() == 3 and np.array_equal(np.asarray(keys.decrypt(dot.ct)), want.astype(np.int64))
    seal = engine.sum([engine.mul_ct_ct(enc(p), k, relin=False) for p, k in zip(ps, cks)])
    assert keys.noise_budget(dot.ct) >= keys.noise_budget(seal.ct) - 1 and dot.budget == seal.budget
