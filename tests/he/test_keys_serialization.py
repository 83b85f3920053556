import numpy as np
import pytest

from cryptogen.he import (ClientKeys, ClientRole, ConfigError, HEConfig, KeyMismatchError, ParameterMismatchError,
                          PublicContext, SecretKeyError, SerializationError, ServerEngine, WrongKindError,
                          EncryptedKVCache)


def test_config_validation():
    with pytest.raises(ConfigError, match="exceeds"):
        HEConfig(qi_sizes=(60,) * 8)
    with pytest.raises(ConfigError, match="no room"):
        HEConfig(n=4096, qi_sizes=(36, 36, 37))
    with pytest.raises(ConfigError, match="1 mod 2n"):
        HEConfig(t=1000003)
    with pytest.raises(ConfigError, match="max_abs_output"):
        HEConfig(max_abs_output=2.0 ** 20)
    with pytest.raises(ConfigError, match="BFV"):
        HEConfig(scheme="ckks")
    with pytest.raises(ConfigError, match="flood_sigma must be at least 40"):
        HEConfig(flood_sigma=0)  # would switch off the flooding that hides the server's weights
    assert HEConfig().fingerprint != HEConfig(qi_sizes=(50, 50, 50, 50, 60)).fingerprint
    assert HEConfig.from_dict(HEConfig().to_dict()) == HEConfig()


def test_public_context_has_no_secret(keys, ctx, engine, client):
    assert ctx.he.is_secret_key_empty() and not keys.he.is_secret_key_empty()
    sk = keys.secret_key_bytes()
    probe = sk[len(sk) // 2: len(sk) // 2 + 64]  # 64 bytes from the middle of the key data
    c_slots = np.arange(ctx.config.n)
    c = engine.encrypt(c_slots)
    cache = EncryptedKVCache(engine, 32)
    server_blobs = [keys.public_context_bytes(), ctx.ct_to_bytes(c.ct), cache.to_bytes(), keys.encrypt_to_bytes(c_slots),
                    engine.export(c)]
    assert all(probe not in b for b in server_blobs)
    with pytest.raises(SecretKeyError):
        ctx.decrypt(c.ct)
    assert not hasattr(engine, "decrypt")
    with pytest.raises(SecretKeyError):
        ServerEngine(keys)
    with pytest.raises(SecretKeyError):
        ClientRole(ctx)


def test_ciphertext_envelope_checks(cfg, keys, ctx, engine, client):
    data = client.s2h_send(np.arange(cfg.n))
    assert engine.receive(data).budget > 100
    with pytest.raises(SerializationError, match="truncated"):
        engine.receive(data[:-100])
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(SerializationError, match="checksum"):
        engine.receive(bytes(bad))
    with pytest.raises(WrongKindError):
        engine.receive(keys.public_context_bytes())
    with pytest.raises(SerializationError):
        engine.receive(b"not an envelope at all, just some bytes......")
    other = ClientKeys.generate(cfg, [])
    with pytest.raises(KeyMismatchError):
        engine.receive(ClientRole(other).s2h_send(np.zeros(cfg.n)))


def test_other_parameter_set_rejected(engine, ctx):
    cfg2 = HEConfig(qi_sizes=(50, 50, 50, 50, 60))
    k2 = ClientKeys.generate(cfg2, [])
    with pytest.raises(ParameterMismatchError):
        engine.receive(ClientRole(k2).s2h_send(np.zeros(cfg2.n)))
    with pytest.raises(ParameterMismatchError):
        PublicContext.from_bytes(k2.public_context_bytes(), ctx.config)


def test_server_rejects_a_context_with_other_parameters(cfg, keys):
    """The client cannot choose the server's policy: a public context whose config differs from the
    server's own (here: flooding at 48 instead of 40 bits; same ciphertext fingerprint) is refused."""
    other = HEConfig(flood_sigma=48)
    assert other.fingerprint == cfg.fingerprint
    theirs = ClientKeys.generate(other).public_context_bytes()
    with pytest.raises(SerializationError, match="differ from the server's in flood_sigma"):
        PublicContext.from_bytes(theirs, cfg)
    assert PublicContext.from_bytes(keys.public_context_bytes(), cfg).config == cfg


def test_client_keys_roundtrip(keys, engine, client):
    k2 = ClientKeys.from_bytes(keys.to_bytes())
    assert k2.key_id == keys.key_id
    c = engine.encrypt(np.arange(keys.config.n) % 7)
    assert np.array_equal(k2.decrypt(c.ct), np.arange(keys.config.n) % 7)
