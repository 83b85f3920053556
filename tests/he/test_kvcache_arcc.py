import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptogen.field import matmul, random_elements

HEAD_GROUPS = [(32, 4), (48, 3)]  # (d_head, heads) per KV block: the shipped model's, an odd one
from cryptogen.he import (CachePositionError, h2s_server, EncryptedKVCache, KeyMismatchError, KVLayout, KVShares,
                          NoiseBudgetError, SerializationError, ShapeError, local_pv, local_scores, probs_slots,
                          pv_decode, pv_prefill, pv_span, qk_decode, qk_prefill, query_slots, read_pv, read_scores)


def _fill(engine, client, cache, K, V, rng, t, prefill=0) -> KVShares:
    """Prefill the first `prefill` tokens, then append the rest one at a time; the client's own shares."""
    lay = cache.layout
    Ks, Vs = random_elements(K.shape, t, rng), random_elements(V.shape, t, rng)
    Kc, Vc = (K - Ks) % t, (V - Vs) % t
    if prefill:
        cache.prefill(0, [client.s2h_send(s) for _, s in lay.run_slots(0, Kc[:prefill])], Ks[:prefill],
                      [client.s2h_send(s) for _, s in lay.run_slots(0, Vc[:prefill])], Vs[:prefill])
    for p in range(prefill, K.shape[0]):
        cache.append(p, client.s2h_send(lay.token_slots(p, Kc[p])), Ks[p],
                     client.s2h_send(lay.token_slots(p, Vc[p])), Vs[p])
    own = KVShares(lay)
    own.write(0, Kc, Vc)
    return own


def _split(x, t, rng):
    """(client share, server share) of x."""
    s = random_elements(np.shape(x), t, rng)
    return (np.asarray(x) - s) % t, s


def _qk(engine, client, keys, cache, own, q, rng, start=None, refresher="client"):
    """Scores of q (heads, d_head) against tokens 0..length-1 as the protocol makes them: the server's
    cross terms (decrypted here) plus the client's own term. ``start``: a prefill query at that position."""
    lay, t = cache.layout, engine.config.t
    qc, qs = _split(np.asarray(q).reshape(lay.heads, lay.d_head), t, rng)
    enc = engine.receive(client.s2h_send(query_slots(lay, qc)))
    who = client if refresher == "client" else None
    if start is None:
        outs, length = qk_decode(engine, cache, enc, qs, who), cache.length
    else:
        outs, length = qk_prefill(engine, cache, [enc], qs[None], start, who)[0], start + 1
    got = read_scores(lay, [keys.decrypt(c.ct) for c in outs], length, t)
    return (got + local_scores(qc, own.k[:length], t)) % t


def _pv(engine, client, keys, cache, own, p, rng, start=None):
    """p (heads, length) . V as the protocol makes it (``start``: a prefill query at that position)."""
    lay, t = cache.layout, engine.config.t
    pc, ps = _split(np.asarray(p).reshape(lay.heads, -1), t, rng)
    n = len(cache.v) if start is None else start // lay.tpc + 1
    enc = [engine.receive(client.s2h_send(probs_slots(lay, pc, c))) for c in range(n)]
    if start is None:
        out, span = pv_decode(engine, cache, enc, ps, client), cache.length
    else:
        out, span = pv_prefill(engine, cache, [enc], ps[:, None], start, client)[0], pv_span(lay, start, 0, pc.shape[1])
    return (read_pv(lay, keys.decrypt(out.ct), t) + local_pv(pc[:, :span], own.v[:span], t)) % t


def _decode_attn(engine, client, keys, cache, own, q, p, rng):
    return _qk(engine, client, keys, cache, own, q, rng), _pv(engine, client, keys, cache, own, p, rng)


def test_append_crosses_ciphertext_boundary(cfg, engine, client, keys, rng):
    d = 48  # not a power of two: tpc = 2 * floor(4096 / 48) = 170
    cache = EncryptedKVCache(engine, d)
    T = cache.layout.tpc + 2
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=cache.layout.tpc - 2)
    assert len(cache.k) == 2 and cache.length == T
    q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
    scores, out = _decode_attn(engine, client, keys, cache, own, q, p, rng)
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
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=lay.tpc - 2)
    assert len(cache.k) == 2
    q, p = random_elements((heads, d), cfg.t, rng), random_elements((heads, T), cfg.t, rng)
    before = engine.stats.ct_pt_mul
    scores, out = _decode_attn(engine, client, keys, cache, own, q, p, rng)
    # q.K^T and p.V, two ct x pt per cache ciphertext each, for all heads; no ct x ct
    assert engine.stats.ct_pt_mul - before == 2 * 2 * 2 and engine.stats.ct_ct_mul == 0
    assert np.array_equal(scores, _per_head(K, q, cfg.t))
    assert np.array_equal(out, _per_head_pv(p, V, cfg.t))


@pytest.mark.parametrize("d, heads", HEAD_GROUPS)
def test_head_group_prefill_attention_causal(cfg, engine, client, keys, rng, d, heads):
    cache = EncryptedKVCache(engine, d, heads=heads)
    lay = cache.layout
    T = lay.tpc + 2
    K, V = random_elements((T, heads, d), cfg.t, rng), random_elements((T, heads, d), cfg.t, rng)
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
    for i in (0, 5, lay.tpr, lay.tpc - 1, lay.tpc + 1):
        sc = _qk(engine, client, keys, cache, own, K[i], rng, start=i)
        assert np.array_equal(sc, _per_head(K[: i + 1], K[i], cfg.t)), i
        p = random_elements((heads, i + 1), cfg.t, rng)
        out = _pv(engine, client, keys, cache, own, p, rng, start=i)
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
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=max(0, min(T, int(T * split))))
    assert len(cache.k) == -(-T // cache.layout.tpc)
    q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
    scores, out = _decode_attn(engine, client, keys, cache, own, q, p, rng)
    assert np.array_equal(scores[0], matmul(K, q[:, None], cfg.t)[:, 0])
    assert np.array_equal(out[0], matmul(p[None], V, cfg.t)[0])


def test_attention_rotates_nothing_and_reads_in_shares(cfg, engine, client, keys, rng):
    """The folds are done in the share domain: q.K^T and p.V make no rotation, no ct x ct and no
    relinearisation at any length, and the client's and server's H2S shares, each summed on its own
    side, plus the client's own term, reconstruct exact scores and outputs (d = 32 at n = 16384:
    tpr = 256, tpc = 512; T = 600 spans two ciphertexts)."""
    d = 32
    for T in (1, 5, 257, 600):
        cache = EncryptedKVCache(engine, d)
        lay = cache.layout
        K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
        own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
        q, p = random_elements(d, cfg.t, rng), random_elements(T, cfg.t, rng)
        (qc, qs), (pc, ps_) = _split(q[None], cfg.t, rng), _split(p[None], cfg.t, rng)
        before = (engine.stats.rotations, engine.stats.ct_ct_mul)
        enc = engine.receive(client.s2h_send(query_slots(lay, qc)))
        outs = qk_decode(engine, cache, enc, qs, client)
        assert all(c.ct.size() == 2 for c in outs)  # nothing to relinearise
        shares = [h2s_server(engine, c) for c in outs]
        sc = (read_scores(lay, [client.h2s_receive(b) for b, _ in shares], T, cfg.t) + local_scores(qc, own.k, cfg.t))
        ss = read_scores(lay, [r for _, r in shares], T, cfg.t)
        ps = [engine.receive(client.s2h_send(probs_slots(lay, pc, c))) for c in range(len(cache.v))]
        pv = pv_decode(engine, cache, ps, ps_, client)
        assert pv.ct.size() == 2
        b, r = h2s_server(engine, pv)
        out = (read_pv(lay, client.h2s_receive(b), cfg.t) + local_pv(pc, own.v, cfg.t) + read_pv(lay, r, cfg.t)) % cfg.t
        assert (engine.stats.rotations, engine.stats.ct_ct_mul) == before, T
        assert np.array_equal((sc + ss)[0] % cfg.t, matmul(K, q[:, None], cfg.t)[:, 0]), T
        assert np.array_equal(out[0], matmul(p[None], V, cfg.t)[0]), T


def test_prefill_attention_causal(cfg, engine, client, keys, rng):
    d, T = 48, 175  # crosses a ciphertext boundary (tpc = 170)
    cache = EncryptedKVCache(engine, d)
    lay = cache.layout
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
    idx = [0, 100, 169, 170, 174]  # a few query tokens (HE is slow); start = idx position
    for i in idx:
        sc = _qk(engine, client, keys, cache, own, K[i], rng, start=i)
        assert np.array_equal(sc[0], matmul(K[: i + 1], K[i][:, None], cfg.t)[:, 0])
        p = random_elements(i + 1, cfg.t, rng)
        out = _pv(engine, client, keys, cache, own, p, rng, start=i)
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
    own = _fill(engine, client, cache, K, K, rng, cfg.t)
    data = cache.to_bytes()
    back = EncryptedKVCache.from_bytes(engine, data)
    assert (back.length, back.layer, back.group, back.layout) == (5, 3, 1, cache.layout)
    assert np.array_equal(keys.decrypt(back.k[0].ct), keys.decrypt(cache.k[0].ct))
    assert np.array_equal(back.shares.k, cache.shares.k) and np.array_equal(back.shares.v, cache.shares.v)
    assert np.array_equal((back.shares.k + own.k) % cfg.t, K)  # the server's shares travel with the cache
    q = random_elements((4, 32), cfg.t, rng)
    assert np.array_equal(_qk(engine, client, keys, back, own, q, rng), _per_head(K, q, cfg.t))
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
    own = _fill(engine, client, cache, K, K, rng, cfg.t)
    q = random_elements(d, cfg.t, rng)
    (q_c, q_s) = _split(q[None], cfg.t, rng)
    qc = engine.receive(client.s2h_send(query_slots(cache.layout, q_c)))
    nm = engine.noise

    def result_budget(kb):  # Enc(k) * q_s + Enc(q_c) * k_s
        return nm.add(nm.after_ct_pt(kb), nm.after_ct_pt(qc.budget))

    lo, hi = 0.0, nm.fresh  # bisect the smallest cache budget that still fits
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if nm.can_send(result_budget(mid)) else (mid, hi)
    cache.k[0].budget = hi
    qk_decode(engine, cache, qc, q_s, client)
    assert engine.stats.refreshes == 0
    cache.k[0].budget = lo
    out = qk_decode(engine, cache, qc, q_s, client)
    assert engine.stats.refreshes == 1 and cache.k[0].budget == nm.fresh
    sc = (read_scores(cache.layout, [keys.decrypt(out[0].ct)], 4, cfg.t) + local_scores(q_c, own.k, cfg.t)) % cfg.t
    assert np.array_equal(sc[0], matmul(K, q[:, None], cfg.t)[:, 0])
    cache.k[0].budget = lo
    with pytest.raises(NoiseBudgetError, match="refresh"):
        qk_decode(engine, cache, qc, q_s, None)


def test_real_low_budget_triggers_refresh(cfg, engine, client, keys, rng):
    """A cache ciphertext that really lost budget (a ct x pt by 1) is refreshed and the result decrypts."""
    d = 32
    cache = EncryptedKVCache(engine, d)
    K = random_elements((3, d), cfg.t, rng)
    own = _fill(engine, client, cache, K, K, rng, cfg.t)
    cache.k[0] = engine.mul_ct_pt(cache.k[0], engine.encode(np.ones(cfg.n)))
    q = random_elements(d, cfg.t, rng)
    (q_c, q_s) = _split(q[None], cfg.t, rng)
    qc = engine.receive(client.s2h_send(query_slots(cache.layout, q_c)))
    out = qk_decode(engine, cache, qc, q_s, client)
    assert engine.stats.refreshes == 1
    data, r = h2s_server(engine, out[0])
    sc = read_scores(cache.layout, [(client.h2s_receive(data) + r) % cfg.t], 3, cfg.t) + local_scores(q_c, own.k, cfg.t)
    sc %= cfg.t
    assert np.array_equal(sc[0], matmul(K, q[:, None], cfg.t)[:, 0])


def test_kv_shares_write_from_a_position_drops_what_lay_beyond(cfg, rng):
    """A step redone after a retry writes the client's shares again from its start."""
    own = KVShares(KVLayout(16, cfg.n, 2))
    A, B = random_elements((40, 2, 16), cfg.t, rng), random_elements((3, 2, 16), cfg.t, rng)
    own.write(0, A[:20], A[:20])
    own.write(20, A[20:], A[20:])  # grows past its first capacity
    assert own.length == 40 and np.array_equal(own.k, A) and np.array_equal(own.v, A)
    own.write(10, B, B[::-1])
    assert own.length == 13 and np.array_equal(own.k[:10], A[:10]) and np.array_equal(own.k[10:], B)
    assert np.array_equal(own.v[10:], B[::-1]) and np.array_equal(own.rows("k", 0), own.k)
    with pytest.raises(CachePositionError, match="next free is 13"):
        own.write(14, B, B)
    with pytest.raises(ShapeError):
        own.write(13, B, B[:2])
    assert own.length == 13


def test_dot_ct_pt_kernel_is_word_for_word_seal(cfg, engine, client, keys, rng, monkeypatch):
    """The attention's ct x pt sums: the NTT-domain kernel gives SEAL's multiply_plain sum, byte for byte,
    and SEAL's path (no kernel) decodes the same cross terms."""
    from cryptogen.he import ntt
    cts = [engine.receive(client.s2h_send(random_elements(cfg.n, cfg.t, rng))) for _ in range(3)]
    pts = [random_elements(cfg.n, cfg.t, rng) for _ in range(3)]
    terms = [(c, p, None, None) for c, p in zip(cts, pts)]
    fast = engine.dot_ct_pt(terms)
    monkeypatch.setattr(ntt, "available", lambda: False)
    slow = engine.dot_ct_pt(terms)
    assert fast.ct.to_bytes("none") == slow.ct.to_bytes("none") and fast.budget == slow.budget
    want = sum(np.asarray(keys.decrypt(c.ct), object) * np.asarray(p, object) for c, p in zip(cts, pts))
    assert np.array_equal(keys.decrypt(fast.ct), np.array([int(x) % cfg.t for x in want], np.int64))


def test_cache_shares_are_checked_when_loaded(cfg, engine, client, rng):
    cache = EncryptedKVCache(engine, 32)
    _fill(engine, client, cache, *(random_elements((3, 32), cfg.t, rng),) * 2, rng, cfg.t)
    cache.shares._k[1, 0, 0] = cfg.t  # not a field element
    with pytest.raises(SerializationError, match="shares"):
        EncryptedKVCache.from_bytes(engine, cache.to_bytes())


def test_prefill_pv_covers_the_masked_shares_of_zero(cfg, engine, client, keys, rng):
    """In a prefill the softmax leaves shares of 0, not zeros, after each query's position: the client's
    own term must cover the same tokens as the server's cross terms (``pv_span``), or they do not cancel."""
    d, T, i = 32, 40, 5
    cache = EncryptedKVCache(engine, d)
    lay = cache.layout
    K, V = random_elements((T, d), cfg.t, rng), random_elements((T, d), cfg.t, rng)
    own = _fill(engine, client, cache, K, V, rng, cfg.t, prefill=T)
    p = np.zeros((1, T), np.int64)
    p[:, :i + 1] = random_elements((1, i + 1), cfg.t, rng)
    pc, ps = _split(p, cfg.t, rng)  # beyond i: uniform shares of 0
    enc = [engine.receive(client.s2h_send(probs_slots(lay, pc, c))) for c in range(i // lay.tpc + 1)]
    out = pv_prefill(engine, cache, [enc], ps[:, None], i, client)[0]
    span = pv_span(lay, i, 0, T)
    assert span == T  # one cache ciphertext holds all 40 tokens
    got = (read_pv(lay, keys.decrypt(out.ct), cfg.t) + local_pv(pc[:, :span], own.v[:span], cfg.t)) % cfg.t
    assert np.array_equal(got[0], matmul(p[:, :i + 1], V[:i + 1], cfg.t)[0])
