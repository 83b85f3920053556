"""The NTT-domain linear-layer kernel (he/ntt.py, he/_ntt.c) against references: Python-integer
negacyclic products, SEAL's own multiply_plain (word for word), and the field product x W."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.field import matmul, random_elements
from cryptogen.he import (ClientKeys, ClientRole, EncodedLinear, ServerEngine, h2s_server, matmul_ct_pt_decode,
                          plan_linear, s2h_server)
from cryptogen.he import ntt
from cryptogen.he.errors import ConfigError
from cryptogen.he.linear import KERNEL_ENV, default_kernel

# small rings for exact checks against Python integers: (n, primes q = 1 mod 2n, up to 60 bits)
SMALL = (16, (97, 1153, 18014398507220993, 1152921504606748673))  # the last two: SEAL's 54- and 60-bit primes
# the first three plan one product per giant step; the last three 3 to 14 products over 2 to 5 giant steps
ODD_SHAPES = [(7, 3), (37, 101), (61, 257), (129, 385), (255, 129), (200, 1001)]


def _negacyclic(a, b, q):
    n, out = len(a), [0] * len(a)
    for i in range(n):
        for j in range(n):
            k, s = (i + j) % n, 1 if i + j < n else -1
            out[k] = (out[k] + s * a[i] * b[j]) % q
    return out


def test_kernel_is_built():
    """bin/bootstrap builds cryptogen/he/_ntt.c; the default kernel is then the NTT one."""
    assert ntt.available()
    assert default_kernel() == "ntt"


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_ntt_products_equal_python_negacyclic_products(data):
    """inverse(mac(forward(x_t), forward(w_t))) = sum_t x_t * w_t in Z_q[X]/(X^n + 1), exactly,
    for residues anywhere in [0, q), including many terms of q - 1 (the 128-bit sums and their
    Barrett reduction)."""
    n, primes = SMALL
    tb = ntt.tables(n, primes, 17)
    terms = data.draw(st.integers(1, 40))
    extreme = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes]) for _ in range(terms)])
    w = np.stack([np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes]) for _ in range(terms)])
    if extreme:
        x[:] = np.array(primes, np.uint64)[None, :, None] - np.uint64(1)
        w[:] = x
    want = np.zeros((len(primes), n), np.uint64)
    for i, q in enumerate(primes):
        acc = [0] * n
        for t in range(terms):
            prod = _negacyclic([int(v) for v in x[t, i]], [int(v) for v in w[t, i]], q)
            acc = [(a + b) % q for a, b in zip(acc, prod)]
        want[i] = acc
    xs = x[:, None].copy()  # (terms, size 1, k, n)
    before = xs.copy()
    ntt.inverse(tb, ntt.forward(tb, xs))
    assert np.array_equal(xs, before)  # the round trip
    ntt.forward(tb, xs)
    ws = ntt.forward(tb, w.copy())
    got = ntt.inverse(tb, ntt.mac(tb, xs, ws, np.arange(terms)))
    assert np.array_equal(got[0], want)


def test_one_giant_step_is_seals_multiply_plain_word_for_word(cfg, keys):
    """SEAL's sum_a multiply_plain(x_a, w_a), with plaintext coefficients on both sides of t/2
    (SEAL lifts them centred), equals the kernel's ciphertext byte for byte."""
    he, n, t, rng = keys.he, cfg.n, cfg.t, np.random.default_rng(3)
    tb = ntt.tables(n, tuple(keys.qi[:len(keys.qi) - 1]), t)
    cts = [keys.encrypt(rng.integers(0, t, n)) for _ in range(3)]
    pts = [keys.encode(rng.integers(0, t, n)) for _ in range(3)]
    coeffs = [ntt.plain_coeffs(p, n) for p in pts]
    assert all((c >= (t + 1) // 2).any() and (c < (t + 1) // 2).any() for c in coeffs)
    ref = he.multiply_plain(cts[0], pts[0], True)
    for c, p in zip(cts[1:], pts[1:]):
        ref += he.multiply_plain(c, p, True)
    prefix, _ = ntt.ct_words(cts[0])
    babies = ntt.forward(tb, np.stack([np.array(ntt.ct_words(c)[1]) for c in cts[::-1]]))  # cts[j] is baby 2 - j
    words = ntt.inverse(tb, ntt.mac(tb, babies, np.stack([ntt.plain_ntt(tb, c) for c in coeffs]), np.array([2, 1, 0])))
    assert ntt.ct_from_words(he, prefix, words).to_bytes("none") == ref.to_bytes("none")


@pytest.fixture(scope="module")
def odd(cfg):
    """Keys with the Galois steps of the odd shapes' plans."""
    plans = {s: plan_linear(*s, cfg.n) for s in ODD_SHAPES}
    steps = set().union(*(p.rotation_steps() for p in plans.values()))
    keys = ClientKeys.generate(cfg, steps)
    return plans, keys, ClientRole(keys), keys.public_context()


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_ntt_and_seal_kernels_give_the_same_ciphertexts_and_the_field_product(cfg, odd, shape):
    """Odd widths and output counts (a 'vocabulary' of 101 or 257 columns): without hoisting both
    kernels return the same output ciphertexts word for word; with hoisted baby steps and summed
    giant steps (he/hoist.py) the ciphertexts decrypt to the same slots. All count the same operations and bound the noise
    alike, and the decrypted shares sum to x W mod t."""
    plans, keys, client, _ctx = odd
    plan, t, rng = plans[shape], cfg.t, np.random.default_rng(sum(shape))
    ctx = keys.public_context(plan.giant_steps())  # baby and giant steps hoisted (he/hoist.py)
    plain = keys.public_context()
    plain.hoist_keys = {}  # every rotation through SEAL
    W, x = random_elements(shape, t, rng), random_elements(shape[0], t, rng)
    xs = random_elements(shape[0], t, rng)
    upload = client.s2h_send(plan.input_slots_decode((x - xs) % t))
    outs, stats = {}, {}
    for kernel, context in (("hoisted", ctx), ("ntt", plain), ("seal", plain)):
        engine = ServerEngine(context)
        enc = EncodedLinear(engine, W, plan, kernel="seal" if kernel == "seal" else "ntt")
        c = s2h_server(engine, upload, plan.input_slots_decode(xs))
        outs[kernel] = matmul_ct_pt_decode(enc, c)
        stats[kernel] = (engine.stats.ct_pt_mul, engine.stats.rotations, engine.stats.additions)
    assert [o.ct.to_bytes("none") for o in outs["ntt"]] == [o.ct.to_bytes("none") for o in outs["seal"]]
    assert set(range(1, plan.g1)) <= set(ctx.hoist_keys) and plan.giant_steps() <= set(ctx.giant_keys)
    for h, s in zip(outs["hoisted"], outs["seal"]):
        assert np.array_equal(keys.decrypt(h.ct), keys.decrypt(s.ct))
        assert keys.noise_budget(h.ct) > 0
    assert [o.budget for o in outs["hoisted"]] == [o.budget for o in outs["ntt"]] == [o.budget for o in outs["seal"]]
    assert stats["hoisted"] == stats["ntt"] == stats["seal"] and stats["ntt"][0] == plan.decode_ct_pt
    engine = ServerEngine(ctx)
    shares = [h2s_server(engine, o) for o in outs["hoisted"]]
    y = (plan.read_output_decode([client.h2s_receive(d) for d, _ in shares], t)
         + plan.read_output_decode([r for _, r in shares], t)) % t
    assert np.array_equal(y, matmul(x[None], W, t)[0])


def test_bad_kernel_choice_is_one_clear_line(monkeypatch, cfg, odd):
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ConfigError, match=r"CRYPTOGEN_LINEAR_KERNEL='fast' is not a linear-layer kernel; choose"):
        default_kernel()
    plans, _keys, _client, ctx = odd
    with pytest.raises(ConfigError, match="unknown linear-layer kernel 'gpu'"):
        EncodedLinear(ServerEngine(ctx), np.ones((7, 3), np.int64), plans[(7, 3)], kernel="gpu")


def test_missing_build_is_one_clear_line(monkeypatch, cfg, odd):
    """A checkout without the compiled kernel: the default falls back to ``seal``; asking for
    ``ntt`` says what to run."""
    monkeypatch.setattr(ntt, "_ntt", None)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert default_kernel() == "seal"
    plans, _keys, _client, ctx = odd
    with pytest.raises(ConfigError, match=r"_ntt.c\) is not built; run bin/bootstrap .* or set CRYPTOGEN_LINEAR_KERNEL=seal"):
        EncodedLinear(ServerEngine(ctx), np.ones((7, 3), np.int64), plans[(7, 3)], kernel="ntt")


def test_lower_level_ciphertexts_use_the_first_primes():
    """A ciphertext with fewer primes than the tables (k < L): the plaintexts' first k rows."""
    n, primes = SMALL
    tb = ntt.tables(n, primes, 17)
    rng = np.random.default_rng(1)
    x = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])
    w = np.stack([rng.integers(0, q, n, dtype=np.uint64) for q in primes])
    full = ntt.inverse(tb, ntt.mac(tb, ntt.forward(tb, x.copy()[None, None]), ntt.forward(tb, w.copy()[None]), np.zeros(1)))
    low = ntt.inverse(tb, ntt.mac(tb, ntt.forward(tb, x[:2].copy()[None, None]), ntt.forward(tb, w.copy()[None]), np.zeros(1)))
    assert np.array_equal(low[0], full[0, :2])


def test_kernel_refuses_mis_sized_buffers():
    n, primes = SMALL
    tb = ntt.tables(n, primes, 17)
    words = np.zeros((1, len(primes), n), np.uint64)
    with pytest.raises(ValueError, match="NTT kernel: term index 5 outside 0..0"):
        ntt.mac(tb, words[None], words[0][None], np.array([5]))
    with pytest.raises(ValueError, match="HE kernel: data has"):
        ntt._ntt.forward(words, tb.tables, tb.qs, 2, len(primes), n)
