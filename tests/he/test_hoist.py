"""Hoisted rotations (he/hoist.py, _ntt.moddown) against references: the coefficient-domain Galois
map, Python-integer rounding division by the special prime, and SEAL's own rotate (same decryption,
noise within its bound)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.he import ClientKeys, ServerEngine, hoist, ntt, threads
from cryptogen.he.engine import Cipher
from cryptogen.he.linear import rotations_ntt

# data primes 97, 1153 and SEAL's 54-bit one; the special prime last (SEAL's 60-bit one)
SMALL = (16, (97, 1153, 18014398507220993, 1152921504606748673))


def _galois(f: list[int], elt: int, q: int) -> list[int]:
    """sigma_elt(f)(X) = f(X^elt) in Z_q[X]/(X^n + 1), coefficient by coefficient."""
    n, out = len(f), [0] * len(f)
    for i, c in enumerate(f):
        e = i * elt % (2 * n)
        out[e % n] = (out[e % n] + (c if e < n else -c)) % q
    return out


def test_psi_is_seals_minimal_primitive_root():
    """SEAL's try_minimal_primitive_root: the least of the primitive 2N-th roots (brute force)."""
    n = 16
    for q in SMALL[1][:2]:
        roots = [r for r in range(2, q) if pow(r, n, q) == q - 1]
        assert ntt._primitive_2n_root(q, n) == min(roots)


@pytest.mark.parametrize("elt", [3, 9, 27 % 32, 31, 5, 17])
def test_galois_map_is_a_permutation_of_ntt_slots(elt):
    n, primes = SMALL
    tb = ntt.tables(n, primes, 17)
    rng = np.random.default_rng(elt)
    f = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])
    want = np.array([_galois([int(v) for v in f[i]], elt, q) for i, q in enumerate(primes)], np.uint64)
    perm = hoist.galois_permutation(n, elt)
    assert np.array_equal(ntt.forward(tb, want.copy()), ntt.forward(tb, f.copy())[:, perm])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_moddown_is_rounded_division_by_the_special_prime(data):
    """out_i = NTT_i(sigma(round(X / p)) + c0) with X the integer of residues acc (CRT over the data
    primes and p), for residues anywhere in [0, q) including q - 1 and p - 1, any Galois map."""
    n, primes = SMALL
    qs, p, L = primes[:-1], primes[-1], len(primes) - 1
    tb = ntt.tables(n, primes, 17)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    extreme = data.draw(st.sampled_from(["random", "top", "half"]))
    acc = np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes]) for _ in range(2)])
    if extreme == "top":
        acc[:] = np.array(primes, np.uint64)[None, :, None] - np.uint64(1)
    elif extreme == "half":  # X mod p at the rounding boundary (p - 1)/2 and just above
        acc[:, L, ::2], acc[:, L, 1::2] = (p - 1) // 2, (p + 1) // 2
    c0 = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in qs])
    elt = data.draw(st.sampled_from([1, 3, 9, 2 * n - 1]))
    Q = 1
    for q in primes:
        Q *= q
    want = np.zeros((2, L, n), np.uint64)
    for k in range(2):
        X = []
        for j in range(n):
            x = sum(int(acc[k, i, j]) * (Q // q) * pow(Q // q, -1, q) for i, q in enumerate(primes)) % Q
            X.append((2 * x + p) // (2 * p))  # round(x / p); p odd: no ties
        for i, q in enumerate(qs):
            want[k, i] = _galois([(v + (int(c0[i, j]) if k == 0 else 0)) % q for j, v in enumerate(X)], elt, q)
    acc_ntt = ntt.forward(tb, acc.copy())
    out = np.empty((2, L, n), np.uint64)
    pinv = np.array([[w := pow(p, -1, q), (w << 64) // q] for q in qs], np.uint64)
    ntt._ntt.moddown(out, acc_ntt, ntt.forward(tb, c0.copy()), hoist.galois_permutation(n, elt),
                     tb.tables, tb.qs, tb.ninv, tb.ratios, pinv, L, n)
    assert np.array_equal(out, ntt.forward(tb, want.copy()))


def test_moddown_refuses_bad_buffers():
    n, primes = SMALL
    tb, L = ntt.tables(n, primes, 17), 3
    args = [np.zeros((2, L, n), np.uint64), np.zeros((2, L + 1, n), np.uint64), np.zeros((L, n), np.uint64),
            np.arange(n, dtype=np.int64), tb.tables, tb.qs, tb.ninv, tb.ratios, np.zeros((L, 2), np.uint64), L, n]
    bad = list(args)
    bad[3] = np.full(n, n, np.int64)
    with pytest.raises(ValueError, match="permutation index out of range"):
        ntt._ntt.moddown(*bad)
    bad = list(args)
    bad[2] = np.zeros((L, n + 1), np.uint64)
    with pytest.raises(ValueError, match="c0 has"):
        ntt._ntt.moddown(*bad)


@pytest.fixture(scope="module")
def hoisting(cfg):
    keys = ClientKeys.generate(cfg, (1, 2, 7, 15, 16, 40, -1, -3))
    return keys, keys.public_context((16, 40))


def test_context_keeps_keys_of_small_positive_steps_only(hoisting):
    _keys, ctx = hoisting
    assert sorted(ctx.hoist_keys) == [1, 2, 7, 15] and sorted(ctx.giant_keys) == [16, 40]  # those asked for
    assert all(k.words.shape == (2, 4, 5, ctx.config.n) for k in ctx.hoist_keys.values())


def test_hoisted_rotations_decrypt_as_seals(cfg, hoisting):
    """rot(x, s) for hoisted steps, SEAL steps and 0 in one call: each decrypts to SEAL's rotation of
    x (full-range slots), with noise budget within 1 bit of SEAL's, and the same noise bound."""
    keys, ctx = hoisting
    rng = np.random.default_rng(5)
    x = rng.integers(0, cfg.t, cfg.n)
    x[:4] = (0, 1, cfg.t - 1, cfg.t // 2)
    engine = ServerEngine(ctx)
    c = Cipher(keys.encrypt(x), engine.noise.fresh)
    steps = [0, 1, 2, 7, 15, 16, -1, 40]
    got = rotations_ntt(engine, c, steps)
    assert engine.stats.rotations == len(steps) - 1
    tb = ntt.tables(cfg.n, tuple(ctx.qi[:-1]), cfg.t)
    for i, s in enumerate(steps):
        ref = engine.rotate(c, s)
        ct = ntt.ct_from_words(ctx.he, got.prefix, ntt.inverse(tb, got.words[i].copy()))
        assert np.array_equal(keys.decrypt(ct), keys.decrypt(ref.ct)), s
        assert keys.noise_budget(ct) >= keys.noise_budget(ref.ct) - 1, s
        assert got.budgets[i] == ref.budget


def test_hoisted_rotations_on_threads_are_word_for_word_the_serial_ones(cfg, hoisting):
    """rotate_many on the HE threads writes each step's words exactly as one rotate call does."""
    keys, ctx = hoisting
    c = keys.encrypt(np.arange(cfg.n) % cfg.t)
    tb = ntt.tables(cfg.n, tuple(int(q) for q in ctx.qi), cfg.t)
    dec = hoist.decompose(tb, ntt.ct_words(c)[1])
    got = hoist.rotate_many(tb, dec, [ctx.hoist_keys[s] for s in (1, 2, 7, 15)])
    assert threads.pool() is not None  # two or more cores (the CI machine has 2)
    for s, words in zip((1, 2, 7, 15), got):
        assert np.array_equal(words, hoist.rotate(tb, dec, ctx.hoist_keys[s])), s


def test_digits_take_the_ntt_rows_they_are_given(cfg, hoisting):
    """The digit kernel's shortcut (c1 already in NTT form: its rows are the digits on their own
    primes) gives the words of the full transform, under a Galois permutation too."""
    _keys, ctx = hoisting
    n = cfg.n
    tb = ntt.tables(n, tuple(int(q) for q in ctx.qi), cfg.t)
    rng = np.random.default_rng(9)
    c1 = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in tb.qs[:4]])
    perm = ctx.giant_keys[16].perm if 16 in ctx.giant_keys else hoist.galois_permutation(n, 3)
    full = hoist._digits(tb, c1, perm)
    assert np.array_equal(hoist._digits(tb, c1, perm, ntt.forward(tb, c1.copy())), full)


def test_summed_giant_steps_decrypt_as_seals_rotations_summed(cfg):
    """sum_b rot(Z_b, s_b) with one mod-down (hoist.giant_sum), a step-0 term among them, equals the
    sum of SEAL's rotations after decryption, with noise budget within 1 bit of it."""
    steps = (16, 40, 7680)
    keys = ClientKeys.generate(cfg, steps)
    ctx = keys.public_context(steps + (99,))  # a step without a key is not kept
    assert sorted(ctx.giant_keys) == sorted(steps)
    engine = ServerEngine(ctx)
    tb = ntt.tables(cfg.n, tuple(int(q) for q in ctx.qi), cfg.t)
    rng = np.random.default_rng(4)
    cts = [Cipher(keys.encrypt(rng.integers(0, cfg.t, cfg.n)), engine.noise.fresh) for _ in range(4)]
    words = [ntt.forward(tb, np.array(ntt.ct_words(c.ct)[1])) for c in cts]
    got = hoist.giant_sum(tb, [(words[0], None)] + [(w, ctx.giant_keys[s]) for w, s in zip(words[1:], steps)])
    ct = ntt.ct_from_words(ctx.he, ntt.ct_words(cts[0].ct)[0], ntt.inverse(tb, got))
    ref = engine.sum([cts[0]] + [engine.rotate(c, s) for c, s in zip(cts[1:], steps)])
    assert np.array_equal(keys.decrypt(ct), keys.decrypt(ref.ct))
    assert keys.noise_budget(ct) >= keys.noise_budget(ref.ct) - 1


def test_stacked_giant_sum_is_word_for_word_the_loop(cfg):
    """giant_sum with the keys in one stack (one multiply-accumulate over all terms, digits on the HE
    threads, c0 summed unreduced) gives exactly the words of the term-by-term loop, for 1 and 9 switched
    terms (past the c0 sum's reduction every 7 terms) with and without a step-0 term."""
    steps = (16, 32, 48)
    keys = ClientKeys.generate(cfg, steps)
    ctx = keys.public_context(steps)
    assert all(k.stack is not None for k in ctx.giant_keys.values())
    loose = {s: hoist.GaloisKey(k.perm, np.ascontiguousarray(k.words)) for s, k in ctx.giant_keys.items()}
    tb = ntt.tables(cfg.n, tuple(int(q) for q in ctx.qi), cfg.t)
    rng = np.random.default_rng(9)
    words = [ntt.forward(tb, np.array(ntt.ct_words(keys.encrypt(rng.integers(0, cfg.t, cfg.n)))[1]))
             for _ in range(10)]
    for plan in ([16], [16, 32, 48, 16, 32, 48, 16, 32, 48]):
        for zero in (False, True):
            terms = [(w, s) for w, s in zip(words[1:], plan)]
            head = [(words[0], None)] if zero else []
            got = hoist.giant_sum(tb, head + [(w, ctx.giant_keys[s]) for w, s in terms])
            want = hoist.giant_sum(tb, head + [(w, loose[s]) for w, s in terms])
            assert np.array_equal(got, want), (len(plan), zero)
