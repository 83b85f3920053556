"""The server reads N, t, the primes and the security level from the loaded SEAL context (not from the
client's envelope metadata) and refuses contexts that are not its own parameters or below 128 bits.

Forged envelopes are built with the project's own helpers (``serialize.pack``/``join_blobs``): a real
SEAL context of other parameters, wrapped with metadata claiming the server's HEConfig.
"""
import struct

import pytest
from Pyfhel import Pyfhel

from cryptogen.he import HEConfig, NoiseModel, PublicContext, SerializationError, ServerEngine
from cryptogen.he import serialize
from cryptogen.he.keys import _key_id


def _forged(cfg: HEConfig, sec: int = 128, patch_sec: int | None = None, **params) -> bytes:
    he = Pyfhel()
    kw = {"n": cfg.n, "t": cfg.t, "qi": list(cfg.expected_qi)} | params
    assert str(he.contextGen(scheme="bfv", sec=sec, **kw)).startswith("success")
    he.keyGen()
    he.relinKeyGen()
    ctx_b = he.to_bytes_context("none")
    if patch_sec is not None:  # claim a security level SEAL was never asked to check
        ctx_b = struct.pack("<i", patch_sec) + ctx_b[4:]
    pk_b = he.to_bytes_public_key("none")
    meta = {"config": cfg.to_dict(), "rotation_steps": [], "qi": list(cfg.expected_qi)}  # lies
    blobs = serialize.join_blobs([ctx_b, pk_b, he.to_bytes_relin_key("none"), b""])
    return serialize.pack("public_context", cfg.fingerprint, _key_id(pk_b), meta, blobs)


def test_genuine_context_accepted_and_used(cfg, keys):
    ctx = PublicContext.from_bytes(keys.public_context_bytes(), cfg)
    assert ctx.qi == cfg.expected_qi and ctx.he.sec == cfg.security_bits
    assert ServerEngine(ctx).noise.qi == ctx.qi  # flooding sized from the loaded primes
    assert ctx.he.get_plain_modulus() == cfg.t and ctx.he.get_poly_modulus_degree() == cfg.n
    assert serialize.seal_context_params(keys.he.to_bytes_context("none"))["qi"] == tuple(keys.he.get_qi())


@pytest.mark.parametrize("params, match", [
    ({"n": 8192, "qi_sizes": [45, 45, 45, 45, 38], "qi": []}, "poly modulus degree N is 8192"),
    ({"t_bits": 40, "t": 0}, "plain modulus t is"),
    ({"qi_sizes": [50, 50, 50, 50, 60], "qi": []}, "coefficient-modulus primes"),
])
def test_forged_parameters_refused(cfg, params, match):
    with pytest.raises(SerializationError, match=match):
        PublicContext.from_bytes(_forged(cfg, sec=0, patch_sec=128, **params), cfg)


def test_sec_zero_refused(cfg):
    with pytest.raises(SerializationError, match=r"sec=0 is below 128 bits"):
        PublicContext.from_bytes(_forged(cfg, sec=0), cfg)  # the server's own primes, SEAL's check off


def test_insecure_modulus_refused_even_if_it_claims_128(cfg):
    data = _forged(cfg, sec=0, patch_sec=128, qi_sizes=[60] * 8, qi=[])  # 480 bits > 438 at N = 16384
    with pytest.raises(SerializationError, match="below 128-bit security"):
        PublicContext.from_bytes(data, cfg)
    with pytest.raises(SerializationError, match="below 128-bit security"):
        PublicContext.from_bytes(data)  # also without an expected config


def test_noise_model_defaults_to_seal_primes(cfg):
    assert NoiseModel(cfg).qi == cfg.expected_qi
