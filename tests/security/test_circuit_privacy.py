"""Circuit privacy of what the server exports (``ServerEngine.export``, cryptogen/he/engine.py).

The client holds the secret key, so it can look inside every ciphertext it receives: the second
component c1 and the noise of c0 + c1 s - Delta m. A ciphertext derived from the client's own
input (Enc(x_c) x W - r) must come back with c1 freshly random (re-randomisation by + Enc_pk(0)) and
noise flooded far above the bound E on the evaluation noise (engine.py / noise.py), freshly drawn
on every export. Each check below fails when one of those steps is removed or weakened:

* ``test_export_c1_is_fresh``: c1 of an export shares (almost) no RNS word with the server's
  pre-export ciphertext, with the client's own input ciphertext, or with a second export of the
  same value; c1 and the difference of two exports' c1 are uniform mod each q_i a download
  carries (chi-square, level 1e-8 per prime; the modulus switch keeps the first
  ``switch_keep`` primes, and the client's lift leaves the others 0). Catches: no + Enc(0) (c1 = the client's c1, or a deterministic function
  of it and of the weights).
* ``test_export_noise_is_flooded``: with need = sigma + (X + log2 n)/2 (2^X exports per key;
  X = log2 n, i.e. need = sigma + log2 n, for a config without an export budget), the measured
  noise budget (client side) drops by at least need - 2 bits from the pre-export ciphertext and
  lies at most 2 bits above b - need for the server's budget bound b (the flood is
  >= 2^(need - 2) E). Catches: no flooding, flooding at sigma = 0, any flood > 4 bits too small.
* ``test_two_exports_have_independent_noise``: Enc(m) - Enc(m) from two exports of the same
  ciphertext has the noise of one export (within 2 bits), not less: the floods are not shared.
Measured (n = 16384, worst-case flooding): 118 bits before export, 46 after (bound: <= 50),
Enc(m) - Enc(m) 45; the budgets are within ~1 bit of their expectation, inside the 2-bit margins.
The chi-square checks have false-alarm < 2e-7 in all (2 scenarios x 4 primes x 2 x 1e-8).
"""
import math

import numpy as np
import pytest

from cryptogen.he import ClientKeys, ClientRole, HEConfig, ServerEngine

from sec_helpers import ct_words as _words, uniform_pvalue

ALPHA = 1e-8


@pytest.fixture(scope="module")
def he():
    cfg = HEConfig()
    keys = ClientKeys.generate(cfg, ())
    return cfg, keys, keys.public_context()


def _scenario(cfg, keys, ctx, linear=True):
    """The client's S2H input, the server's masked (linear) result, and two exports of it."""
    rng = np.random.default_rng(5)
    eng = ServerEngine(ctx)
    x_c = rng.integers(0, cfg.t, cfg.n)
    w = rng.integers(-(1 << 12), 1 << 12, cfg.n)
    r = rng.integers(0, cfg.t, cfg.n)
    sent = ClientRole(keys).s2h_send(x_c)
    c = eng.receive(sent)
    y = eng.sub_ct_pt(eng.mul_ct_pt(c, eng.encode(w)) if linear else c, r)
    expect = np.mod((x_c * w if linear else x_c) - r, cfg.t)  # |x_c w| < 2^54: no int64 overflow
    exports = [keys.ct_from_bytes(eng.export(y)) for _ in range(2)]
    inside = keys.ct_from_bytes(ctx.ct_to_bytes(y.ct))  # the server's pre-export ciphertext
    return dict(sent=keys.ct_from_bytes(sent), y=y, inside=inside, exports=exports, expect=expect)


@pytest.mark.parametrize("linear", [True, False], ids=["ct_x_pt", "h2s_only"])
def test_export_c1_is_fresh(he, linear):
    cfg, keys, ctx = he
    s = _scenario(cfg, keys, ctx, linear)
    e1, e2 = s["exports"]
    dec = keys.decrypt(e1)
    assert np.array_equal(dec, keys.decrypt(e2)) and np.array_equal(dec, keys.decrypt(s["inside"]))
    assert np.array_equal(dec, s["expect"])
    keep = ctx.switch_keep  # a download carries its first `keep` primes (modulus-switched); the rest is 0
    assert not _words(e1)[:, keep:].any()
    c1 = _words(e1)[1][:keep]
    qi = list(ctx.qi)[:keep]
    for other, what in ((s["inside"], "the server's pre-export ciphertext"), (s["sent"], "the client's input"),
                        (e2, "a second export of the same value")):
        same = float((_words(other)[1][:keep] == c1).mean())
        assert same < 0.01, f"c1 of an export equals c1 of {what} in {same:.0%} of its words"
    diff = np.mod(c1 - _words(e2)[1][:keep], np.array(qi, np.int64)[:, None])
    for i, q in enumerate(qi):
        for vals, what in ((c1[i], "c1"), (diff[i], "c1 - c1'")):
            p = uniform_pvalue(vals, q, 64)
            assert p > ALPHA, f"{what} mod q_{i} is not uniform (p={p:.1e})"


def required_flood_bits(cfg) -> float:
    """log2(A / E) the design needs: the flood's size over the evaluation-noise bound E.
    sigma + (X + log2 n)/2 for a per-key budget of 2^X exports (engine.py, noise.py rules 6-8);
    sigma + log2 n (the per-ciphertext union bound) when the config has no export budget."""
    ln = math.log2(cfg.n)
    return cfg.flood_sigma + (getattr(cfg, "max_exports_log2", ln) + ln) / 2


def test_export_noise_is_flooded(he):
    cfg, keys, ctx = he
    s = _scenario(cfg, keys, ctx)
    need = required_flood_bits(cfg)
    before = keys.noise_budget(s["inside"])
    for e in s["exports"]:
        after = keys.noise_budget(e)
        assert after > 0
        assert before - after >= need - 2, (f"export noise only {before - after} bits above the evaluation "
                                            f"noise; flooding needs {need:.1f}")
        assert after <= s["y"].budget - need + 2, (
            f"measured budget {after} after export: the flood is below 2^{need:.1f} times the noise bound "
            f"of the server's budget {s['y'].budget:.1f}")


def test_two_exports_have_independent_noise(he):
    cfg, keys, ctx = he
    s = _scenario(cfg, keys, ctx)
    e1, e2 = s["exports"]
    zero = e1 - e2
    assert not keys.decrypt(zero).any()
    one = min(keys.noise_budget(e1), keys.noise_budget(e2))
    both = keys.noise_budget(zero)
    assert abs(both - one) <= 2, (f"Enc(m) - Enc(m) from two exports has a noise budget of {both} bits, one "
                                  f"export {one}: the flooding noise is shared between exports")
