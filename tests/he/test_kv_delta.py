"""Incremental checkpoints of the encrypted KV cache (``EncryptedKVCache.delta_bytes`` / ``apply_delta``):
a whole checkpoint followed by the deltas of later steps restores the live cache byte for byte (the
reference: the live cache's own whole serialisation), whatever the steps were: prefill runs, appends
across ciphertext boundaries, refreshes of old ciphertexts. Bad deltas change nothing."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptogen.field import random_elements
from cryptogen.he import EncryptedKVCache, KeyMismatchError, SerializationError
from cryptogen.he.convert import refresh

D_HEAD, HEADS = 128, 32  # 4,096 slots per token: 4 tokens per ciphertext at N = 16384, boundaries come early


def _write(engine, client, cache, rng, T):
    """T more tokens: one append (T == 1) or a prefill run, random shares of random values."""
    lay, t, start = cache.layout, engine.config.t, cache.length
    Kc, Ks, Vc, Vs = (random_elements((T, HEADS, D_HEAD), t, rng) for _ in range(4))
    if T == 1:
        cache.append(start, client.s2h_send(lay.token_slots(start, Kc[0])), Ks[0],
                     client.s2h_send(lay.token_slots(start, Vc[0])), Vs[0])
    else:
        cache.prefill(start, [client.s2h_send(s) for _, s in lay.run_slots(start, Kc)], Ks,
                      [client.s2h_send(s) for _, s in lay.run_slots(start, Vc)], Vs)


def _saved_whole(cache) -> bytes:
    data = cache.to_bytes()
    cache.mark_saved()
    return data


def _restore(engine, whole: bytes, deltas: list[bytes]) -> EncryptedKVCache:
    back = EncryptedKVCache.from_bytes(engine, whole)
    for d in deltas:
        back.apply_delta(d)
    return back


def test_a_chain_of_decode_deltas_restores_the_live_cache(cfg, engine, client, rng):
    cache = EncryptedKVCache(engine, D_HEAD, layer=2, group=1, heads=HEADS)
    _write(engine, client, cache, rng, 6)  # a prefill over two ciphertexts
    whole, deltas = _saved_whole(cache), []
    for step in range(5):  # appends: position 6, 7 fill ciphertext 1, 8 starts ciphertext 2
        _write(engine, client, cache, rng, 1)
        if step == 3:
            cache.k[0] = refresh(engine, cache.k[0], client)  # what a low budget does in arcc._refresh_cache
        deltas.append(cache.delta_bytes())
        cache.mark_saved()
        assert _restore(engine, whole, deltas).to_bytes() == cache.to_bytes()
    one = cache.k[0].ct.sizeof_ciphertext("none")  # a delta carries the touched ciphertexts only:
    assert [round(len(d) / one) for d in deltas] == [2, 2, 2, 3, 2]  # a K and a V; the refresh's K too
    assert cache.length == 11 and len(cache.k) == 3


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_any_steps_restore_byte_for_byte(cfg, engine, client, steps, seed):
    """Runs of 1-5 tokens, each step maybe refreshing the oldest V ciphertext."""
    rng = np.random.default_rng(seed)
    cache = EncryptedKVCache(engine, D_HEAD, heads=HEADS)
    _write(engine, client, cache, rng, 2)
    whole, deltas = _saved_whole(cache), []
    for T, refresh_v in steps:
        _write(engine, client, cache, rng, T)
        if refresh_v:
            cache.v[0] = refresh(engine, cache.v[0], client)
        deltas.append(cache.delta_bytes())
        cache.mark_saved()
    assert _restore(engine, whole, deltas).to_bytes() == cache.to_bytes()


def test_no_saved_base_means_a_whole_checkpoint(cfg, engine, client, rng):
    cache = EncryptedKVCache(engine, D_HEAD, heads=HEADS)
    _write(engine, client, cache, rng, 1)
    assert cache.delta_bytes() is None
    cache.mark_saved()
    assert cache.delta_bytes() is not None


def test_a_bad_delta_changes_nothing(cfg, engine, client, rng):
    """A delta that skips one, a truncated one, one for another cache or another key: a clear error and
    the cache as it was."""
    cache = EncryptedKVCache(engine, D_HEAD, layer=1, heads=HEADS)
    _write(engine, client, cache, rng, 3)
    whole = _saved_whole(cache)
    deltas = []
    for _ in range(3):  # positions 3 (end of ciphertext 0), 4 and 5 (ciphertext 1)
        _write(engine, client, cache, rng, 1)
        deltas.append(cache.delta_bytes())
        cache.mark_saved()
    back = EncryptedKVCache.from_bytes(engine, whole)
    before = back.to_bytes()
    with pytest.raises(SerializationError, match="new ciphertexts|past its shares"):
        back.apply_delta(deltas[2])  # made after deltas[1], which started ciphertext 1
    with pytest.raises(SerializationError):
        back.apply_delta(deltas[0][:-1])
    other = EncryptedKVCache(engine, D_HEAD, layer=0, heads=HEADS)
    _write(engine, client, other, rng, 3)
    other.mark_saved()
    _write(engine, client, other, rng, 1)
    with pytest.raises(SerializationError, match="another cache"):
        back.apply_delta(other.delta_bytes())
    from cryptogen.he import ClientKeys, ServerEngine
    stranger = EncryptedKVCache(ServerEngine(ClientKeys.generate(cfg, []).public_context()), D_HEAD, layer=1, heads=HEADS)
    with pytest.raises(KeyMismatchError):
        stranger.apply_delta(deltas[0])
    assert back.to_bytes() == before
    back.apply_delta(deltas[0])
    assert back.length == 4
