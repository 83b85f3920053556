"""Worst-case noise bounds (noise.py) against the client's measured budgets, and the per-key export budget.

SEAL reports the budget rounded down to whole bits, so "bound holds" means est <= measured + 1.
Tolerances for "not absurdly loose": ct x pt with adversarial plaintexts within 8 bits of the proven
worst case (measured 4), a linear-kernel output within 25 bits (measured ~17: the sum over D terms
is bounded by the triangle inequality), a flooded ciphertext within 3 bits (the flood dominates).
"""
import numpy as np
import pytest
from Pyfhel import PyPtxt

from cryptogen.field import random_elements
from cryptogen.he import (ClientKeys, ClientRole, EncodedLinear, HEConfig, NoiseModel, ServerEngine, h2s_server,
                          matmul_ct_pt_decode, reconstruct)
from cryptogen.he.engine import ExportLimitError, _flood_residues, _irwin_hall_j


def _coeff_plaintext(engine, coeffs):
    """A plaintext with the given polynomial coefficients (in [0, t)), edited into SEAL's serialization."""
    raw = engine.encode(np.zeros(engine.config.n, np.int64)).to_bytes("none")
    data = np.asarray(coeffs, np.uint64).tobytes()
    return PyPtxt(pyfhel=engine.ctx.he, bytestring=raw[:-len(data)] + data)


def _adversarial(engine, rng):
    n, t = engine.config.n, engine.config.t
    half = (t - 1) // 2  # lifted by SEAL to +-(t-1)/2
    signs = rng.integers(0, 2, n)
    return [_coeff_plaintext(engine, np.full(n, half)), _coeff_plaintext(engine, np.full(n, half + 1)),
            _coeff_plaintext(engine, np.where(signs == 1, half, half + 1))]


def test_ct_pt_bound_holds_and_is_not_loose(cfg, engine, keys, rng):
    worst = 0.0
    for pt in _adversarial(engine, rng) + [engine.encode(random_elements(cfg.n, cfg.t, rng))]:
        for k in (0, 1, 2):
            x = engine.rotate(engine.encrypt(random_elements(cfg.n, cfg.t, rng)), k)
            y = engine.mul_ct_pt(x, pt)
            meas_x, meas_y = keys.noise_budget(x.ct), keys.noise_budget(y.ct)
            assert x.budget <= meas_x + 1 and y.budget <= meas_y + 1
            worst = max(worst, meas_x - meas_y)  # measured budget consumed by the product
    cost = engine.noise.ct_pt_cost()  # lt + ln - 1 = 55 bits at n = 16384
    assert worst <= cost + 1
    assert worst >= cost - 8  # an all-(t-1)/2 plaintext gets within 8 bits of the proven worst case (measured: 4)


def test_kernel_outputs_and_exports_stay_within_the_bound(cfg, engine, keys, client, plans, rng):
    """Linear kernel with weights at the field's extremes, many exports: every static bound holds,
    and after flooding the bound is tight (the flood dominates)."""
    plan = plans[(128, 384)]
    half = (cfg.t - 1) // 2
    W = np.where(rng.integers(0, 2, (plan.d_in, plan.d_out)) == 1, half, cfg.t - half)
    enc = EncodedLinear(engine, W, plan)
    gaps = []
    for _ in range(3):
        x = engine.receive(client.s2h_send(plan.input_slots_decode(random_elements(plan.d_in, cfg.t, rng))))
        for y in matmul_ct_pt_decode(enc, x):
            assert y.budget <= keys.noise_budget(y.ct) + 1 <= y.budget + 25  # sum over D = 128 terms: loose
            data, r = h2s_server(engine, y)
            meas = client.measured_budget(data)
            est = engine.noise.after_flood(engine.noise.after_add_plain(y.budget))
            assert est <= meas + 1 and meas > 0
            gaps.append(meas - est)
            assert np.array_equal(reconstruct(client.h2s_receive(data), r, cfg.t), keys.decrypt(y.ct))
    for _ in range(20):  # plain ct x pt exports with adversarial plaintexts
        y = engine.mul_ct_pt(engine.encrypt(random_elements(cfg.n, cfg.t, rng)), _adversarial(engine, rng)[2])
        meas = client.measured_budget(engine.export(y))
        est = engine.noise.after_flood(y.budget)
        assert est <= meas + 1
        gaps.append(meas - est)
    assert max(gaps) <= 3


def test_flood_sampler_is_irwin_hall(cfg):
    j = _irwin_hall_j(60000)
    freq = np.bincount(j.astype(np.int64), minlength=3) / j.size
    assert np.allclose(freq, [1 / 6, 2 / 3, 1 / 6], atol=0.01)
    q, a = cfg.expected_qi[0], 10
    f = _flood_residues(a, 50000, [q])[0].astype(object)
    f = np.array([v - q if v > q // 2 else v for v in f], np.int64)
    assert f.min() >= -3 * 2 ** (a - 1) and f.max() < 3 * 2 ** (a - 1)
    assert abs(f.mean()) < 0.02 * 2 ** a and abs(f.std() / 2 ** a - 0.5) < 0.01  # Var = 3 A^2 / 12


@pytest.mark.parametrize("a", [10, 60, 61, 142, 200])
def test_flood_kernel_adds_the_reference_flood(cfg, monkeypatch, a):
    """_flood_into (one C call) adds exactly _flood_residues' values for the same random stream, to
    c0 words anywhere in [0, q) (q - 1 included), for floods of one to four 60-bit limbs."""
    from cryptogen.he import engine as eng
    qs = [int(q) for q in cfg.expected_qi[:-1]]
    n = 4096

    def draws():
        stream = np.random.default_rng(a).bytes(1 << 22)
        pos = [0]

        def fake(k):
            pos[0] += k
            return stream[pos[0] - k:pos[0]]
        return fake
    monkeypatch.setattr(eng, "_random_bytes", draws())
    want = eng._flood_residues(a, n, qs)
    c0 = np.stack([np.resize(np.array([0, 1, q - 1, q // 2], np.uint64), n) for q in qs])
    base = c0.copy()
    monkeypatch.setattr(eng, "_random_bytes", draws())
    eng._flood_into(c0, a, qs)
    for i, q in enumerate(qs):
        assert np.array_equal(c0[i], ((base[i].astype(object) + want[i].astype(object)) % q).astype(np.uint64))


def test_flooding_grows_with_the_export_budget(cfg, engine):
    b = 80.0
    a = {x: NoiseModel(HEConfig(max_exports_log2=x)).flood_exponent(b) for x in (0, 10, 20, 30)}
    assert a[0] < a[10] < a[20] < a[30] and abs((a[30] - a[10]) - 10) <= 1  # +X/2 bits (Hellinger composition)
    assert engine.flood_bits(b) == engine.noise.flood_exponent(b) == a[20]
    m = engine.noise
    assert m.flood_cost(b) < cfg.flood_sigma + cfg.max_exports_log2 + m.ln + 1  # cheaper than uniform + union bound
    assert m.per_ciphertext_tv_log2() == -(cfg.flood_sigma + cfg.max_exports_log2 / 2)


def test_export_counter_refuses_beyond_the_budget(rng):
    cfg = HEConfig(max_exports_log2=1)
    keys = ClientKeys.generate(cfg)
    ctx = keys.public_context()
    eng, eng2 = ServerEngine(ctx), ServerEngine(keys.public_context())  # same key: one count
    x = eng.encrypt(np.zeros(cfg.n, np.int64))
    eng.export(x)
    assert eng2.exports_left == 1
    eng2.export(x)
    with pytest.raises(ExportLimitError, match=r"this key has exported 2 ciphertexts.*2\^1 .*reconnect to make new keys"):
        eng.export(x)
    other = ServerEngine(ClientKeys.generate(cfg).public_context())  # a new key set starts again
    assert other.exports_left == 2 and ClientRole(keys).keys is keys


def test_workers_sharing_a_key_split_its_budget():
    """A session's W worker processes export under one key: each gets 2^X / W."""
    cfg = HEConfig(max_exports_log2=2)
    eng = ServerEngine(ClientKeys.generate(cfg).public_context(), export_share=2)
    x = eng.encrypt(np.zeros(cfg.n, np.int64))
    eng.export(x)
    eng.export(x)
    with pytest.raises(ExportLimitError, match="its share of the 2\\^2"):
        eng.export(x)


def test_config_checks_the_worst_case_room():
    with pytest.raises(Exception, match="max_exports_log2"):
        HEConfig(max_exports_log2=41)
    with pytest.raises(Exception, match="no room .*worst-case"):
        HEConfig(n=8192, qi_sizes=(45, 45, 45, 45, 38))  # the old default: 180 data bits cannot hold it


def _chains(model: NoiseModel, n: int) -> dict:
    """Budget left after flooding for the kernels' worst chains (docs/HE.md "Worst-case flooding")."""
    m, out = model, {}
    for D in (128, 768, 3072):  # linear: baby rotation, ct x pt, sum over D, giant rotation + folds
        b = m.after_fold(m.after_rotate(m.after_ct_pt(m.after_rotate(m.fresh), D)), int(np.log2(D)) // 2)
        out[f"linear{D}"] = m.after_flood(m.after_add_plain(b))
    k_cache = m.add(*[m.fresh] * (n // 64))  # a K/V ciphertext holding n/64 appended tokens
    out["qk"] = m.after_flood(m.after_fold(m.after_ct_ct(m.fresh, k_cache), 6))
    out["pv"] = m.after_flood(m.after_fold(m.after_ct_ct(m.fresh, k_cache, 4), int(np.log2(n // 128)) + 1))
    return out


def test_default_parameters_fit_the_kernels_worst_case():
    old = HEConfig.__new__(HEConfig)  # the pre-#14 default, unvalidated (HEConfig now refuses it)
    for k, v in {**HEConfig().to_dict(), "n": 8192, "qi_sizes": (45, 45, 45, 45, 38)}.items():
        object.__setattr__(old, k, v)
    new = _chains(NoiseModel(HEConfig()), 16384)
    assert all(b >= 13 for b in new.values()), new  # >= 13 bits to spare at N = 16384
    assert all(b < 0 for b in _chains(NoiseModel(old), 8192).values())  # nothing fits at N = 8192


def test_export_enc_zero_is_a_public_key_encryption_of_zero(cfg, engine, keys, client, rng, monkeypatch):
    """The export's own Enc_pk(0) (data level): decrypts to 0 with its noise inside rule 1b's bound and
    within 12 bits of it (measured 6-7 over: the bound takes every coefficient at its worst), a fresh c1
    each time, u uniform ternary and e SEAL's CBD; exports with it, and without the kernel (SEAL's
    Enc(0)), decrypt."""
    from cryptogen.he import ntt
    from cryptogen.he.enczero import ternary
    from cryptogen.he.wire import cbd_noise
    k = len(cfg.expected_qi) - 1
    prefix = ntt.ct_words(engine.encrypt(np.zeros(cfg.n, np.int64)).ct)[0]
    z1, z2 = engine._enc_zero(k), engine._enc_zero(k)
    ct = ntt.ct_from_words(engine.ctx.he, prefix, z1)
    assert np.all(keys.decrypt(ct) == 0)
    measured = keys.noise_budget(ct)
    assert engine.noise.enc_zero <= measured + 1 <= engine.noise.enc_zero + 12, measured
    assert not np.array_equal(z1[1], z2[1]) and not np.array_equal(z1[0], z2[0])
    u, e = ternary(90000), cbd_noise(90000)
    assert np.allclose(np.bincount(u + 1, minlength=3) / u.size, 1 / 3, atol=0.01) and u.min() == -1 and u.max() == 1
    assert -21 <= e.min() and e.max() <= 21 and abs(e.mean()) < 0.05 and abs(e.std() - 10.5 ** 0.5) < 0.05
    x = random_elements(cfg.n, cfg.t, rng)
    c = engine.receive(client.s2h_send(x))
    c1s = [ntt.ct_words(keys.ct_from_bytes(engine.export(c)))[1][1] for _ in range(2)]
    assert np.any(c1s[0]) and not np.array_equal(*c1s)  # the flood touches c0 only: a fresh c1 is Enc(0)'s
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(ntt, "available", lambda: False)
        data, r = h2s_server(engine, c)
        assert np.array_equal((client.h2s_receive(data) + r) % cfg.t, x), kernel
