import numpy as np
import pytest

from cryptogen.field import random_elements
from cryptogen.he import NoiseBudgetError, h2s_server, reconstruct, refresh, s2h_server


def test_h2s_s2h_roundtrip(cfg, engine, client, rng, keys):
    x = random_elements(cfg.n, cfg.t, rng)
    xs = random_elements(cfg.n, cfg.t, rng)
    c = s2h_server(engine, client.s2h_send((x - xs) % cfg.t), xs)
    data, r = h2s_server(engine, c)
    share = client.h2s_receive(data)
    assert np.array_equal(reconstruct(share, r, cfg.t), x)
    assert engine.stats.rerandomizations == 1 and engine.stats.cts_server_to_client == 1
    # re-randomised: the exported ciphertext is not the server's ciphertext minus r
    assert client.measured_budget(data) < keys.noise_budget(c.ct) - 40


def test_static_estimate_is_conservative(cfg, engine, keys, rng):
    x = engine.encrypt(random_elements(cfg.n, cfg.t, rng))
    y = engine.mul_ct_pt(x, engine.encode(random_elements(cfg.n, cfg.t, rng)))
    z = engine.mul_ct_ct(x, engine.encrypt(random_elements(cfg.n, cfg.t, rng)))
    w = engine.window_sum(z, 16, 1)
    for c in (x, y, z, w):
        assert c.budget <= keys.noise_budget(c.ct)
    flooded = engine.export(y)
    meas = keys.noise_budget(keys.ct_from_bytes(flooded))
    assert y.budget - engine.noise.flood_cost() <= meas + 1  # static bound holds after flooding
    assert meas > 0


def test_export_refuses_when_budget_too_low(cfg, engine, rng):
    x = engine.encrypt(random_elements(cfg.n, cfg.t, rng))
    y = engine.mul_ct_pt(engine.mul_ct_pt(x, engine.encode(np.ones(cfg.n))), engine.encode(np.ones(cfg.n)))
    with pytest.raises(NoiseBudgetError, match="budget"):
        engine.export(y)


def test_refresh_restores_budget(cfg, engine, client, keys, rng):
    x = random_elements(cfg.n, cfg.t, rng)
    c = engine.mul_ct_pt(engine.encrypt(x), engine.encode(np.ones(cfg.n)))
    fresh = refresh(engine, c, client)
    assert engine.stats.refreshes == 1
    assert fresh.budget == engine.noise.fresh and keys.noise_budget(fresh.ct) >= 120
    assert np.array_equal(keys.decrypt(fresh.ct), x)
