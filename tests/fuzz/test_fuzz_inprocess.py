"""Fuzz of the receive paths both parties share, in one process (no server): HE ciphertext and
public-context bytes (cryptogen/he), the HE linear step's frames (cryptogen/twoparty.py) and the
2PC protocols' frames (cryptogen/mpc), mutated by hypothesis, from the client against the server
and from the server against the client. Every case ends with a project error whose message is
one line, or (where the mutated bytes are indistinguishable from honest ones) finishes; a frame
of another dtype, shape or out of the field is never accepted; nothing hangs."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_helpers as fh
import inproc_fuzz as ip

pytestmark = pytest.mark.fuzz
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def he():
    return ip.HEFixture()


@pytest.fixture(scope="module")
def small_ctx():
    """A small genuine public context (one rotation step): what the context cases mutate."""
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    keys = ClientKeys.generate(HEConfig(), (1,))
    return keys, keys.public_context_bytes()


def _expect_clear(fn, must_fail: bool):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - classified here
        why = fh.clear(e)
        assert why is None, why
        return f"error:{type(e).__name__}"
    assert not must_fail, "malformed bytes were accepted"
    return "accepted"


# ---- ciphertexts ------------------------------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(layer=st.sampled_from(["whole", "payload", "meta", "header"]), mutation=fh.byte_mutation(),
       side=st.sampled_from(["server", "client"]))
def test_mutated_ciphertext_bytes(he, fuzz_cases, layer, mutation, side):
    """Client -> server (S2H input) and server -> client (H2S output) ciphertext envelopes."""
    fuzz_cases["inprocess: ciphertext bytes"] += 1
    label, mutate = mutation
    data = ip.envelope_layers()[layer](he.ct, mutate)
    accept = he.accept_server if side == "server" else he.accept_client
    # the checksum covers everything; re-sealed, the header's fields and the SEAL layout are checked
    must_fail = layer in ("whole", "header") and data != he.ct
    _expect_clear(lambda: accept(data), must_fail)


def _foreign(he):
    from cryptogen.he import serialize
    meta, body, fp, kid = serialize.unpack(he.ct, "ciphertext")

    def patch(offset, value):
        b = bytearray(body)
        b[offset:offset + len(value)] = value
        return serialize.pack("ciphertext", fp, kid, meta, bytes(b))

    prod = he.keys.he.multiply(he.keys.encrypt(np.ones(he.cfg.n, np.int64)), he.keys.encrypt(np.ones(he.cfg.n)),
                               True)  # 3 polynomials (no relinearisation)
    return {
        "another key set": he.other.ct_to_bytes(he.other.encrypt(np.zeros(he.cfg.n))),
        "a public context": he.public[:4096],
        "other parameters": serialize.pack("ciphertext", b"\1" * 16, kid, meta, body),
        "other kind": serialize.pack("kv_cache", fp, kid, meta, body),
        "NTT form": patch(48, b"\1"),
        "3 polynomials": he.keys.ct_to_bytes(prod),
        "lower level": patch(65, (3).to_bytes(8, "little")),
        "other degree": patch(57, (8192).to_bytes(8, "little")),
        "empty": b"",
        "not bytes": np.zeros(3, np.int64),
        "payload truncated": serialize.pack("ciphertext", fp, kid, meta, body[: len(body) // 2]),
        "payload extended": serialize.pack("ciphertext", fp, kid, meta, body + b"\0" * 8),
        "envelope truncated": he.ct[:-1],
    }


FOREIGN = ["another key set", "a public context", "other parameters", "other kind", "NTT form", "3 polynomials",
           "lower level", "other degree", "empty", "not bytes", "payload truncated", "payload extended",
           "envelope truncated"]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_or_malformed_ciphertext_is_refused(he, fuzz_cases, case, side):
    fuzz_cases["inprocess: foreign ciphertexts"] += 1
    data = _foreign(he)[case]
    _expect_clear(lambda: (he.accept_server if side == "server" else he.accept_client)(data), must_fail=True)


# ---- public contexts (client -> server) ---------------------------------------------------------------
def _context_layer(blob, layer, mutate):
    import hashlib

    from cryptogen.he import serialize
    if layer in ("whole", "meta"):
        return ip.envelope_layers()[layer](blob, mutate)
    meta, payload, fp, kid = serialize.unpack(blob, "public_context")
    parts = serialize.split_blobs(payload)
    i = ["context", "public key", "relin key", "galois keys"].index(layer)
    parts[i] = mutate(parts[i])
    kid = hashlib.sha256(parts[1]).digest()[:16]  # a consistent key id: the blob itself is what is tested
    return serialize.pack("public_context", fp, kid, meta, serialize.join_blobs(parts))


def _use(ctx):
    """A context the server accepted must work: encrypt, rotate by every claimed step, export."""
    from cryptogen.he.engine import ServerEngine
    eng = ServerEngine(ctx)
    c = eng.encrypt(np.zeros(ctx.config.n, np.int64))
    for s in ctx.rotation_steps:
        c = eng.swap_rows(c) if s == 0 else eng.rotate(c, s)
    eng.export(c)


@settings(max_examples=15, **SETTINGS)
@given(layer=st.sampled_from(["whole", "meta", "context", "public key", "relin key", "galois keys"]),
       mutation=fh.byte_mutation())
def test_mutated_public_context(small_ctx, fuzz_cases, layer, mutation):
    from cryptogen.he.keys import PublicContext
    from cryptogen.he.params import HEConfig
    fuzz_cases["inprocess: public context bytes"] += 1
    keys, blob = small_ctx
    data = _context_layer(blob, layer, mutation[1])
    _expect_clear(lambda: _use(PublicContext.from_bytes(data, HEConfig())), must_fail=layer == "whole"
                  and data != blob)


@settings(max_examples=15, **SETTINGS)
@given(key=st.sampled_from(["config", "rotation_steps", "qi", "extra"]), sub=st.sampled_from(
    ["n", "t", "qi_sizes", "flood_sigma", "security_bits", "frac_bits", "whole"]),
    value=st.sampled_from(fh.FIELD_VALUES + [[1, 2, 3], [0, 1, 2, 4, 8], [8192], [-1], list(range(40))]))
def test_public_context_metadata(small_ctx, fuzz_cases, key, sub, value):
    """The envelope's metadata JSON (re-sealed): the server compares it as data and reads the
    real parameters from the SEAL blobs; claimed rotation steps must have Galois keys."""
    from cryptogen.he import serialize
    from cryptogen.he.keys import PublicContext
    from cryptogen.he.params import HEConfig
    fuzz_cases["inprocess: public context metadata"] += 1
    keys, blob = small_ctx
    meta, payload, fp, kid = serialize.unpack(blob, "public_context")
    if key == "config" and sub != "whole":
        meta["config"][sub] = value
    else:
        meta[key] = value
    data = serialize.pack("public_context", fp, kid, meta, payload)
    ok_steps = meta.get("rotation_steps") in ([], [1])
    must_fail = (key == "config") or (key == "rotation_steps" and not ok_steps)
    _expect_clear(lambda: _use(PublicContext.from_bytes(data, HEConfig())), must_fail)


@pytest.mark.parametrize("case", sorted(ip.WRONG_PARAMETERS))
def test_public_context_with_wrong_he_parameters_is_refused(fuzz_cases, case):
    from cryptogen.he.keys import PublicContext
    from cryptogen.he.params import HEConfig
    fuzz_cases["inprocess: wrong HE parameters"] += 1
    cfg = HEConfig()
    data = ip.wrong_parameters(cfg, case)
    _expect_clear(lambda: PublicContext.from_bytes(data, cfg), must_fail=True)


# ---- the HE linear step's frames (twoparty.py) ---------------------------------------------------------
@settings(max_examples=16, **SETTINGS)
@given(sender=st.sampled_from(["client", "server"]), where=st.floats(0, 1, exclude_max=True),
       mutation=st.sampled_from(fh.FRAME_KINDS), seed=st.integers(0, 2 ** 16))
def test_linear_step_frames(he, fuzz_cases, sender, where, mutation, seed):
    """Client -> server: the encrypted input; server -> client: the masked outputs (H2S)."""
    fuzz_cases["inprocess: HE linear frames"] += 1
    frames = 1 if sender == "client" else he.plan.decode_outputs
    assert ip.run_linear(he, sender, int(where * frames), mutation, seed)["hit"]


# ---- the 2PC protocols' frames (mpc/) --------------------------------------------------------------------
@settings(max_examples=50, **SETTINGS)
@given(protocol=st.sampled_from(sorted(ip.PROTOCOLS)), sender=st.sampled_from(["client", "server"]),
       where=st.floats(0, 1, exclude_max=True), mutation=st.sampled_from(fh.FRAME_KINDS), seed=st.integers(0, 2 ** 16))
def test_mpc_protocol_frames(fuzz_cases, protocol, sender, where, mutation, seed):
    fuzz_cases["inprocess: 2PC frames"] += 1
    n = int(where * ip.frame_count(protocol, sender))
    assert ip.run_pair(protocol, sender, n, mutation, seed)["hit"]


# ---- the dealer-free provider's offline link (pool.py, provider_he.py) ------------------------------------
@settings(max_examples=8, **SETTINGS)
@given(sender=st.sampled_from(["client", "server"]), n=st.integers(0, 4), mutation=st.sampled_from(fh.FRAME_KINDS),
       seed=st.integers(0, 2 ** 16))
def test_offline_link_frames(fuzz_cases, sender, n, mutation, seed):
    """Client -> server: batch headers, the provider's public context, input ciphertexts;
    server -> client: the masked products. Errors reach the online protocol as ProviderError
    naming a project cause (never a bare library exception type)."""
    fuzz_cases["inprocess: offline-link frames"] += 1
    ip.run_offline(sender, n, mutation, seed)
