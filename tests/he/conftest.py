"""Session fixtures: one key set at the default parameters (N = 16384; N = 4096 cannot hold t ~ 2^42, docs/HE.md)."""
import numpy as np
import pytest

from cryptogen.he import (ClientKeys, ClientRole, HEConfig, ServerEngine, plan_linear,
                          required_rotation_steps)

SHAPES = [(100, 37), (128, 384), (64, 130)]


@pytest.fixture(scope="session")
def cfg():
    return HEConfig()


@pytest.fixture(scope="session")
def plans(cfg):
    return {s: plan_linear(*s, cfg.n) for s in SHAPES}


@pytest.fixture(scope="session")
def keys(cfg, plans):
    window_sums = ServerEngine.window_sum_steps(32, 1)  # the noise tests' rotate-and-add (the kernels fold in shares)
    return ClientKeys.generate(cfg, required_rotation_steps(plans.values()) | window_sums)


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


def run_linear_many(engine, client, enc, X, Xs, b, timeout=120):
    """``linear_many_*`` on two threads over an in-memory channel: (client's Y share, server's, client channel)."""
    import threading

    from cryptogen.mpc.channel import channel_pair
    from cryptogen.twoparty import linear_many_client, linear_many_server
    t = engine.config.t
    cc, sc = channel_pair(timeout=timeout)
    out = {}
    server = threading.Thread(target=lambda: out.setdefault("s", linear_many_server(sc, engine, enc, Xs, b)))
    server.start()
    Yc = linear_many_client(cc, client, enc.plan, (X - Xs) % t)
    server.join()
    return Yc, out["s"], cc
