"""Compact ciphertext wire forms (cryptogen/he/wire.py): packed coefficients and seeded uploads.

References: SEAL's own bytes (a packed ciphertext must unpack to exactly them), SEAL's decryption
(a seeded upload must decrypt to its slots), and a public-key encryption's measured noise budget."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.field import random_elements
from cryptogen.he import SerializationError, serialize, wire


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 64), groups=st.integers(1, 4), seed=st.integers(0, 2 ** 32 - 1))
def test_pack_bits_round_trip(bits, groups, seed):
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    values = rng.integers(0, 2 ** 63, size=64 * groups, dtype=np.uint64) & np.uint64(top)
    values[0] = np.uint64(top)  # the extreme value of the width
    data = wire.pack_bits(values, bits)
    assert len(data) == wire.packed_len(values.size, bits) == 8 * bits * groups
    assert np.array_equal(wire.unpack_bits(data, bits, values.size), values)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 64), groups=st.integers(1, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_pack_kernels_are_the_numpy_reference(bits, groups, seed):
    """The C packing and unpacking (_wire.pack / unpack) give byte for byte what the numpy reference does."""
    assert wire._wire is not None  # bin/bootstrap builds the kernels: compare them, not numpy with itself
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2 ** 63, size=64 * groups, dtype=np.uint64) * np.uint64(2) + np.uint64(seed & 1)
    values &= np.uint64((1 << bits) - 1)
    data = wire.pack_bits(values, bits)
    assert data == wire.pack_bits_np(values, bits)
    assert np.array_equal(wire.unpack_bits(data, bits, values.size), wire.unpack_bits_np(data, bits, values.size))


@settings(max_examples=20, deadline=None)
@given(widths=st.lists(st.sampled_from([40, 54, 60]), min_size=1, max_size=5), size=st.integers(1, 2),
       seed=st.integers(0, 2 ** 32 - 1))
def test_rows_of_one_width_pack_as_prime_by_prime(widths, size, seed):
    """Runs of primes with one width are packed in one call: the bytes must be those of packing
    each (prime, all polynomials) row on its own, in prime order, and unpack to the words."""
    rng = np.random.default_rng(seed)
    words = np.stack([rng.integers(0, 2 ** 63, (size, 128), dtype=np.uint64) >> np.uint64(64 - w) for w in widths], 1)
    spec = b"".join(wire.pack_bits(words[:, i].reshape(-1), w) for i, w in enumerate(widths))
    assert wire._pack(words, widths) == spec
    assert np.array_equal(wire._unpack(spec, 0, words.shape, widths, "packed"), words)


def test_expand_seed_is_deterministic_and_uniform(ctx):
    qi, n = ctx.qi[:-1], ctx.config.n
    a, b = wire.expand_seed(b"\1" * 32, qi, n), wire.expand_seed(b"\1" * 32, qi, n)
    c = wire.expand_seed(b"\2" * 32, qi, n)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for i, q in enumerate(qi):
        assert int(a[i].max()) < q
        # mean of n uniform residues: q/2 within 6 standard deviations (q / sqrt(12 n))
        assert abs(a[i].astype(np.float64).mean() / q - 0.5) < 6 / np.sqrt(12 * n)
    assert not np.array_equal(a[0], a[1] % np.uint64(qi[0]))  # independent streams per prime


def test_cbd_noise_is_seals_error_distribution():
    e = wire.cbd_noise(1 << 16)
    assert np.abs(e).max() <= 21 and abs(e.mean()) < 0.1
    assert abs(e.std() - np.sqrt(10.5)) < 0.1  # sigma = sqrt(21/2) = 3.24, SEAL's 3.2


def test_packed_ciphertext_is_sealss_bytes(keys, ctx, engine):
    c = engine.encrypt(random_elements(ctx.config.n, ctx.config.t))
    raw = c.ct.to_bytes("none")
    data = ctx.ct_to_bytes(c.ct)
    assert len(data) < 0.86 * len(raw)  # 54 of 64 bits per coefficient
    assert keys.ct_from_bytes(data).to_bytes("none") == raw


def test_seeded_upload_decrypts_and_is_smaller(keys, ctx, engine):
    cfg = ctx.config
    m = random_elements(cfg.n, cfg.t)
    data = keys.encrypt_to_bytes(m)
    public = keys.ct_to_bytes(keys.encrypt(m))
    assert len(data) < 0.45 * len(keys.encrypt(m).to_bytes("none")) and len(data) < len(public)
    ct = ctx.ct_from_bytes(data)  # the server's view: c1 expanded from the seed
    assert np.array_equal(keys.decrypt(ct), m)
    # fresh symmetric noise (e alone) is below a public-key encryption's: at least its budget
    assert keys.noise_budget(ct) >= keys.noise_budget(keys.encrypt(m))
    # the server computes on it like on any ciphertext
    out = engine.add_ct_pt(engine.receive(data), np.ones(cfg.n, np.int64))
    assert np.array_equal(keys.decrypt(out.ct), np.mod(m + 1, cfg.t))
    # two uploads of the same slots share nothing: fresh seeds, fresh c0
    again = keys.encrypt_to_bytes(m)
    _, p1, _, _ = serialize.unpack(data, "ciphertext")
    _, p2, _, _ = serialize.unpack(again, "ciphertext")
    seed = slice(wire.PREFIX, wire.PREFIX + wire.SEED_BYTES)
    assert p1[seed] != p2[seed] and p1[wire.PREFIX + 32:] != p2[wire.PREFIX + 32:]


def test_seeded_upload_is_the_same_with_and_without_the_ntt_kernel(keys, monkeypatch):
    """The client's c0 through the NTT kernel (2k NTTs, one C call) equals Pyfhel's multiply_plain
    and add_plain word for word: with the same randomness (seed and error) the two uploads are the same bytes."""
    import os

    from cryptogen.he import ntt
    m = random_elements(keys.config.n, keys.config.t)
    stream = np.random.default_rng(11).bytes(1 << 20)

    def upload():
        pos = [0]

        def fake(k):
            pos[0] += k
            return stream[pos[0] - k:pos[0]]
        with monkeypatch.context() as mp:
            mp.setattr(os, "urandom", fake)
            return keys.encrypt_to_bytes(m)
    assert ntt.available()
    with_kernel = upload()
    monkeypatch.setattr(ntt, "_ntt", None)
    assert with_kernel == upload()


def test_seeded_c0_kernel_equals_seals_scaling_at_the_extremes(keys):
    """_ntt.seeded_c0 (-a*s, SEAL's Delta*m rounding and e in one C call) against Pyfhel's
    multiply_plain and add_plain: slots at 0, 1, t-1 and (t+-1)/2, errors at +-21 and 0."""
    t, n = keys.config.t, keys.config.n
    slots = np.resize(np.array([0, 1, t - 1, (t - 1) // 2, (t + 1) // 2], np.int64), n)
    e = np.resize(np.array([21, -21, 0, 1, -1], np.int64), n)
    for seed in (bytes(32), bytes(range(32))):
        assert np.array_equal(keys._seeded_c0(slots, seed, e), keys._seeded_c0(slots, seed, e, kernel=False))


def _reform(data, meta, payload):
    m, _, fp, kid = serialize.unpack(data, "ciphertext")
    return serialize.pack("ciphertext", fp, kid, meta if meta is not None else m, payload)


def test_malformed_wire_forms_are_refused(keys, ctx):
    cfg = ctx.config
    data = keys.encrypt_to_bytes(np.arange(cfg.n) % 5)
    _, payload, _, _ = serialize.unpack(data, "ciphertext")
    cases = [
        ("unknown wire form", _reform(data, {"form": "raw"}, payload)),
        ("unknown wire form", _reform(data, {}, payload)),
        ("seeded payload of", _reform(data, None, payload[:-8])),
        ("packed payload of", _reform(data, {"form": "packed"}, payload)),
        # c0's first coefficient set to 2^54 - 1 >= q_0: SEAL's own range check
        ("rejected by SEAL", _reform(data, None, payload[:wire.PREFIX + 32] + b"\xff" * 6 + b"\x3f"
                                     + payload[wire.PREFIX + 39:])),
    ]
    for want, blob in cases:
        with pytest.raises(SerializationError, match=want):
            ctx.ct_from_bytes(blob)


def test_switched_download_decrypts_with_the_same_budget(keys, ctx, engine, client):
    cfg = ctx.config
    assert ctx.switch_keep == 2  # 108 of the 216 data bits: t (1 + N) / Q' = 2^-52
    m = random_elements(cfg.n, cfg.t)
    x = engine.mul_ct_pt(engine.encrypt(m), engine.encode(np.full(cfg.n, 3)))
    data = engine.export(x)
    packed = keys.ct_to_bytes(x.ct)
    assert len(data) < 0.51 * len(packed)
    assert np.array_equal(client.h2s_receive(data), np.mod(3 * m, cfg.t))
    # the switch keeps the invariant noise: the budget the client measures is the packed one's, +-1 bit
    assert abs(client.measured_budget(data) - keys.noise_budget(keys.ct_from_bytes(
        keys.words_to_bytes(*engine._flood(x.ct, x.budget))))) <= 1


def _crt(res, moduli):
    m = 1
    for q in moduli:
        m *= int(q)
    return sum(int(r) * (m // int(q)) * pow(m // int(q), -1, int(q)) for r, q in zip(res, moduli)) % m, m


def test_switch_down_rounds_like_integers(ctx):
    """switch_down against Python integers (CRT-compose c, round(c Q'/Q) mod Q'): equal up to 1, the
    double rounding of dropping one prime at a time (|error| <= 1/2 + 1/2q per coefficient)."""
    rng = np.random.default_rng(5)
    qi, keep, n = ctx.qi[:-1], 2, 64
    words = np.stack([rng.integers(0, q, size=(2, n), dtype=np.uint64) for q in qi], axis=1)
    words[0, :, 0] = 0  # the extremes: 0 and Q - 1
    words[0, :, 1] = [q - 1 for q in qi]
    low = wire.switch_down(words, qi, keep)
    exact = 0
    for j in range(n):
        c, big_q = _crt(words[0, :, j], qi)
        got, small_q = _crt(low[0, :, j], qi[:keep])
        want = (c * small_q + big_q // 2) // big_q % small_q
        assert (got - want) % small_q in (0, 1, small_q - 1)
        exact += got == want
    assert exact == n  # double rounding differs from one rounding only within 1/q_L of a tie


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_switch_down_kernel_is_the_numpy_reference(ctx, keep):
    """The C switch (_wire.switch_down) gives word for word the numpy reference's switch, the extremes
    0, q_i - 1 and the centring boundaries (q_L - 1) / 2, (q_L + 1) / 2 of the dropped primes included."""
    assert wire._wire is not None
    rng = np.random.default_rng(keep)
    qi, n = ctx.qi[:-1], 256
    words = np.stack([rng.integers(0, q, size=(2, n), dtype=np.uint64) for q in qi], axis=1)
    words[0, :, 1] = [q - 1 for q in qi]
    words[0, :, 0] = 0
    words[1, :, 2] = [q // 2 for q in qi]
    words[1, :, 3] = [q // 2 + 1 for q in qi]
    assert np.array_equal(wire.switch_down(words, qi, keep), wire.switch_down_np(words, qi, keep))


def test_seeded_upload_carries_fresh_error(keys, ctx):
    """Enc(0) seeded: c0 + c1 s is the error e itself, SEAL's centred binomial (not 0, |e| <= 21)."""
    from Pyfhel import PyCtxt
    cfg = ctx.config
    ct = ctx.ct_from_bytes(keys.encrypt_to_bytes(np.zeros(cfg.n, np.int64)))
    raw = ct.to_bytes("none")
    w = np.frombuffer(raw, np.uint64, offset=wire.PREFIX).reshape(2, -1, cfg.n)
    c1c1 = PyCtxt(pyfhel=keys.he, bytestring=raw[:wire.PREFIX] + np.stack([w[1], w[1]]).tobytes())
    neg = keys.he.multiply_plain(c1c1, keys._secret_plain(), True)  # (-c1 s, -c1 s)
    q = keys.qi[0]
    minus = np.frombuffer(neg.to_bytes("none"), np.uint64, offset=wire.PREFIX).reshape(2, -1, cfg.n)[0, 0]
    e = (w[0, 0].astype(object) - minus.astype(object)) % q
    e = np.array([int(v) - q if v > q // 2 else int(v) for v in e])
    assert np.abs(e).max() <= 21 and 2.5 < e.std() < 4.0
