"""Session fixtures: one N=8192 key set (N=4096 cannot hold t ~ 2^42, see docs/HE.md)."""
import numpy as np
import pytest

from cryptogen.he import (ClientKeys, ClientRole, HEConfig, KVLayout, ServerEngine, plan_linear,
                          required_rotation_steps)

SHAPES = [(100, 37), (128, 384), (64, 130)]
D_HEADS = [32, 48]
HEAD_GROUPS = [(32, 4), (48, 3)]  # (d_head, heads) packed per KV block: the shipped model's, an odd one


@pytest.fixture(scope="session")
def cfg():
    return HEConfig()


@pytest.fixture(scope="session")
def plans(cfg):
    return {s: plan_linear(*s, cfg.n) for s in SHAPES}


@pytest.fixture(scope="session")
def keys(cfg, plans):
    lays = [KVLayout(d, cfg.n) for d in D_HEADS] + [KVLayout(d, cfg.n, h) for d, h in HEAD_GROUPS]
    return ClientKeys.generate(cfg, required_rotation_steps(plans.values(), lays))


@pytest.fixture(scope="session")
def ctx(keys):
    return keys.public_context()


@pytest.fixture()
def engine(ctx):
    return ServerEngine(ctx)


@pytest.fixture(scope="session")
def client(keys):
    return ClientRole(keys)


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)
