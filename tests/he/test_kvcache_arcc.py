import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptogen.field import matmul, random_elements

HEAD_GROUPS = [(32, 4), (48, 3)]  # (d_head, heads) per KV block: the shipped model's, an odd one
from cryptogen.he import (CachePositionError, h2s_server, EncryptedKVCache, KeyMismatchError, KVLayout, NoiseBudgetError,
                          SerializationError, ShapeError, probs_slots, pv_decode, pv_prefill, qk_decode,
                          qk_prefill, query_slots, read_pv, read_scores)


def _fill(engine, client, cache, K, V, rng, t, prefill=0):
    """Prefill the first `prefill` tokens, then append the rest one at a time."""
    lay = cache.layout
    Ks, Vs = random_elements(K.shape, t, rng), random_elements(V.shape, t, rng)
    Kc, Vc = (K - Ks) % t, (V - Vs) % t
    if prefill:
        cache.prefill(0, [client.s2h_send(s) for _, s in lay.run_slots(0, Kc[:prefill])], Ks[:prefill],
                      [client.s2h_send(s) for _, s in lay.run_slots(0, Vc[:prefill])], Vs[:prefill])
    for p in range(prefill, K.shape[0]):
        cache.append(p, client.s2h_send(lay.token_slots(p, Kc[p])), Ks[p],
                     client.s2h_send(lay.token_slots(p, Vc[p])), Vs[p])


def _decode_attn(engine, client, keys, cache, q, p):
    lay, t = cache.layout, engine.config.t
    qc = engine.receive(client.s2h_send(query_slots(lay, q)))
    scores = read_scores(lay, [keys.decrypt(c.ct) for c in qk_decode(engine, cache, qc, client)], cache.length, t)
    ps = [engine.receive(client.s2h_send(probs_slots(lay, p, c))) for c in range(len(cache.v))]
    out = read_pv(lay, keys.decrypt(pv_decode(engine, cache, ps, client).ct), t)
    return scores, out


def test_append_crosses_ciphertext_boundary(cfg, engine, client, keys, rng):
    d = 48  # not a power of two: tpc = 2 * floor(4096 / 48) = 170
    cache = EncryptedKVCache(engine, d)
    T = cache.layout.tpc + 2
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    _fill(engine, client, cache, K, V, rng, cfg.t, prefill=cache.layout.tpc - 2)
    assert len(cache.k) == 2 and cache.length == T
    q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
    scores, out = _decode_attn(engine, client, keys, cache, q, p)
    assert np.array_equal(scores[0], matmul(K, q[:, None], cfg.t)[:, 0])
    assert np.array_equal(out[0], matmul(p[None], V, cfg.t)[0])
    assert engine.stats.refreshes == 0


def _per_head(K, q, t):
    """Plaintext reference for a head group: (heads, T) scores of q (heads, d) against K (T, heads, d)."""
    return np.stack([matmul(K[:, h], q[h][:, None], t)[:, 0] for h in range(K.shape[1])])


def _per_head_pv(p, V, t):
    """(heads, d) outputs of p (heads, T) over V (T, heads, d)."""
    return np.stack([matmul(p[h][None], V[:, h], t)[0] for h in range(V.shape[1])])


@pytest.mark.parametrize("d, heads", HEAD_GROUPS)
def test_head_group_decode_across_a_boundary_equals_each_head(cfg, engine, client, keys, rng, d, heads):
    """Heads packed side by side in each token block: one q.K^T and one p.V serve the whole group,
    and every head's scores and outputs equal its own plaintext ones (tpc = 128 at d = 32 x 4,
    112 at d = 48 x 3: the cache crosses into a second ciphertext)."""
    cache = EncryptedKVCache(engine, d, heads=heads)
    lay = cache.layout
    assert lay.tpc == 2 * ((cfg.n // 2) // (d * heads))
    T = lay.tpc + 3
    K, V = random_elements((T, heads, d), cfg.t, rng), random_elements((T, heads, d), cfg.t, rng)
    _fill(engine, client, cache, K, V, rng, cfg.t, prefill=lay.tpc - 2)
    assert len(cache.k) == 2
    q, p = random_elements((heads, d), cfg.t, rng), random_elements((heads, T), cfg.t, rng)
    before = engine.stats.ct_ct_mul
    scores, out = _decode_attn(engine, client, keys, cache, q, p)
    assert engine.stats.ct_ct_mul - before == 2 * 2  # q.K^T and p.V, per cache ciphertext, for all heads
    assert np.array_equal(scores, _per_head(K, q, cfg.t))
    assert np.array_equal(out, _per_head_pv(p, V, cfg.t))


@pytest.mark.parametrize("d, heads", HEAD_GROUPS)
def test_head_group_prefill_attention_causal(cfg, engine, client, keys, rng, d, heads):
    cache = EncryptedKVCache(engine, d, heads=heads)
    lay = cache.layout
    T = lay.tpc + 2
    K, V = random_elements((T, heads, d), cfg.t, rng), random_elements((T, heads, d), cfg.t, rng)
    _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
    for i in (0, 5, lay.tpr, lay.tpc - 1, lay.tpc + 1):
        qs = [engine.receive(client.s2h_send(query_slots(lay, K[i])))]
        rows = qk_prefill(engine, cache, qs, start=i)
        sc = read_scores(lay, [keys.decrypt(c.ct) for c in rows[0]], i + 1, cfg.t)
        assert np.array_equal(sc, _per_head(K[: i + 1], K[i], cfg.t)), i
        p = random_elements((heads, i + 1), cfg.t, rng)
        ps = [[engine.receive(client.s2h_send(probs_slots(lay, p, c))) for c in range(i // lay.tpc + 1)]]
        out = read_pv(lay, keys.decrypt(pv_prefill(engine, cache, ps, start=i)[0].ct), cfg.t)
        assert np.array_equal(out, _per_head_pv(p, V[: i + 1], cfg.t)), i


def test_head_group_shapes_are_checked(cfg):
    lay = KVLayout(48, cfg.n, 3)
    assert lay.token_slots(0, np.ones((3, 48), np.int64)).sum() == 144
    for bad in (np.ones(48), np.ones((4, 48)), np.ones((3, 47))):
        with pytest.raises(ShapeError, match=r"shape \(3, 48\)"):
            lay.token_slots(0, bad)
    with pytest.raises(ShapeError, match=r"\(3, T\)"):
        probs_slots(lay, np.ones((2, 5)), 0)
    with pytest.raises(ShapeError, match="n/2"):
        KVLayout(64, cfg.n, cfg.n // 64)


def test_append_does_not_rotate(cfg, engine, client, rng):
    cache = EncryptedKVCache(engine, 32)
    K = random_elements((3, 32), cfg.t, rng)
    _fill(engine, client, cache, K, K, rng, cfg.t)
    assert engine.stats.rotations == 0 and engine.stats.ct_ct_mul == 0


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 300), split=st.floats(0, 1), seed=st.integers(0, 2 ** 16))
def test_decode_attention_random_lengths(cfg, engine, client, keys, T, split, seed):
    rng = np.random.default_rng(seed)
    d = 32
    cache = EncryptedKVCache(engine, d)
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    _fill(engine, client, cache, K, V, rng, cfg.t, prefill=max(0, min(T, int(T * split))))
    assert len(cache.k) == -(-T // cache.layout.tpc)
    q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
    scores, out = _decode_attn(engine, client, keys, cache, q, p)
    assert np.array_equal(scores[0], matmul(K, q[:, None], cfg.t)[:, 0])
    assert np.array_equal(out[0], matmul(p[None], V, cfg.t)[0])


def test_attention_rotates_nothing_and_reads_in_shares(cfg, engine, client, keys, rng):
    """The folds are done in the share domain: q.K^T and p.V make no rotation at any length (p.V's
    products are summed unrelinearised), and the client's and server's H2S shares, each summed on its own side, reconstruct exact scores
    and outputs (d = 32 at n = 16384: tpr = 256, tpc = 512; T = 600 spans two ciphertexts)."""
    d = 32
    for T in (1, 5, 257, 600):
        cache = EncryptedKVCache(engine, d)
        lay = cache.layout
        K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
        _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
        q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
        before = engine.stats.rotations
        qc = engine.receive(client.s2h_send(query_slots(lay, q)))
        shares = [h2s_server(engine, c) for c in qk_decode(engine, cache, qc, client)]
        sc = read_scores(lay, [client.h2s_receive(b) for b, _ in shares], T, cfg.t)
        ss = read_scores(lay, [r for _, r in shares], T, cfg.t)
        ps = [engine.receive(client.s2h_send(probs_slots(lay, p, c))) for c in range(len(cache.v))]
        pv = pv_decode(engine, cache, ps, client)
        assert pv.ct.size() == 3  # the products' sum, relinearised once by the export
        b, r = h2s_server(engine, pv)
        out = (read_pv(lay, client.h2s_receive(b), cfg.t) + read_pv(lay, r, cfg.t)) % cfg.t
        assert engine.stats.rotations == before, T
        assert np.array_equal((sc + ss)[0] % cfg.t, matmul(K, q[:, None], cfg.t)[:, 0]), T
        assert np.array_equal(out[0], matmul(p[None], V, cfg.t)[0]), T


def test_prefill_attention_causal(cfg, engine, client, keys, rng):
    d, T = 48, 175  # crosses a ciphertext boundary (tpc = 170)
    cache = EncryptedKVCache(engine, d)
    lay = cache.layout
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
    idx = [0, 100, 169, 170, 174]  # a few query tokens (HE is slow); start = idx position
    for i in idx:
        qs = [engine.receive(client.s2h_send(query_slots(lay, K[i])))]
        rows = qk_prefill(engine, cache, qs, start=i)
        sc = read_scores(lay, [keys.decrypt(c.ct) for c in rows[0]], i + 1, cfg.t)
        assert np.array_equal(sc[0], matmul(K[: i + 1], K[i][:, None], cfg.t)[:, 0])
        p = random_elements(i + 1, cfg.t, rng)
        ps = [[engine.receive(client.s2h_send(probs_slots(lay, p, c))) for c in range(i // lay.tpc + 1)]]
        out = read_pv(lay, keys.decrypt(pv_prefill(engine, cache, ps, start=i)[0].ct), cfg.t)
        assert np.array_equal(out[0], matmul(p[None], V[: i + 1], cfg.t)[0])


def test_wrong_position_leaves_cache_unchanged(cfg, engine, client, rng):
    cache = EncryptedKVCache(engine, 32)
    K = random_elements((2, 32), cfg.t, rng)
    _fill(engine, client, cache, K, K, rng, cfg.t)
    snap = cache.to_bytes()
    good = client.s2h_send(cache.layout.token_slots(2, K[0]))
    for pos in (1, 3, 0):
        with pytest.raises(CachePositionError, match="next free is 2"):
            cache.append(pos, good, K[0], good, K[0])
    with pytest.raises(ShapeError):
        cache.append(2, good, K[0][:5], good, K[0])
    with pytest.raises(SerializationError):
        cache.append(2, good, K[0], good[:-3], K[0])
    assert cache.to_bytes() == snap and cache.length == 2


def test_cache_serialization(cfg, engine, client, keys, rng, ctx):
    cache = EncryptedKVCache(engine, 32, layer=3, group=1, heads=4)
    K = random_elements((5, 4, 32), cfg.t, rng)
    _fill(engine, client, cache, K, K, rng, cfg.t)
    data = cache.to_bytes()
    back = EncryptedKVCache.from_bytes(engine, data)
    assert (back.length, back.layer, back.group, back.layout) == (5, 3, 1, cache.layout)
    assert np.array_equal(keys.decrypt(back.k[0].ct), keys.decrypt(cache.k[0].ct))
    assert cache.nbytes() / cache.length > 0
    with pytest.raises(SerializationError):
        EncryptedKVCache.from_bytes(engine, data[:-1])
    from cryptogen.he import ClientKeys, ServerEngine
    other = ServerEngine(ClientKeys.generate(cfg, []).public_context())
    with pytest.raises(KeyMismatchError):
        EncryptedKVCache.from_bytes(other, data)


def test_lazy_refresh_exactly_at_boundary(cfg, engine, client, keys, rng):
    """A refresh happens iff the static estimate says the q.K^T result could not be sent."""
    d = 32
    cache = EncryptedKVCache(engine, d)
    K = random_elements((4, d), cfg.t, rng)
    _fill(engine, client, cache, K, K, rng, cfg.t)
    q = random_elements(d, cfg.t, rng)
    qc = engine.receive(client.s2h_send(query_slots(cache.layout, q)))
    nm = engine.noise

    def result_budget(kb):
        return nm.after_ct_ct(qc.budget, kb)

    lo, hi = 0.0, nm.fresh  # bisect the smallest cache budget that still fits
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if nm.can_send(result_budget(mid)) else (mid, hi)
    cache.k[0].budget = hi
    qk_decode(engine, cache, qc, client)
    assert engine.stats.refreshes == 0
    cache.k[0].budget = lo
    out = qk_decode(engine, cache, qc, client)
    assert engine.stats.refreshes == 1 and cache.k[0].budget == nm.fresh
    sc = read_scores(cache.layout, [keys.decrypt(out[0].ct)], 4, cfg.t)
    assert np.array_equal(sc[0], matmul(K, q[:, None], cfg.t)[:, 0])
    cache.k[0].budget = lo
    with pytest.raises(NoiseBudgetError, match="refresh"):
        qk_decode(engine, cache, qc, None)


def test_real_low_budget_triggers_refresh(cfg, engine, client, keys, rng):
    """A cache ciphertext that really lost budget (a ct x pt by 1) is refreshed and the result decrypts."""
    d = 32
    cache = EncryptedKVCache(engine, d)
    K = random_elements((3, d), cfg.t, rng)
    _fill(engine, client, cache, K, K, rng, cfg.t)
    cache.k[0] = engine.mul_ct_pt(cache.k[0], engine.encode(np.ones(cfg.n)))
    q = random_elements(d, cfg.t, rng)
    qc = engine.receive(client.s2h_send(query_slots(cache.layout, q)))
    out = qk_decode(engine, cache, qc, client)
    assert engine.stats.refreshes == 1
    data, r = h2s_server(engine, out[0])
    sc = read_scores(cache.layout, [(client.h2s_receive(data) + r) % cfg.t], 3, cfg.t)
    assert np.array_equal(sc[0], matmul(K, q[:, None], cfg.t)[:, 0])
