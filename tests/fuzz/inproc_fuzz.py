"""In-process fuzz runners (no server process): one party's outgoing frames are mutated and the
other party's real receive path must end with a clear error (or, where the mutated frame is
indistinguishable from an honest one, finish).

* ``run_pair``: a 2PC protocol of cryptogen/mpc (both parties over an in-memory channel, dealer
  randomness), the ``n``-th frame one side sends mutated.
* ``run_linear``: the HE linear step of cryptogen/twoparty.py (client encrypts, server evaluates
  and exports), the ``n``-th frame one side sends mutated.
* ``run_offline``: the dealer-free provider's offline link (pool.py / provider_he.py), the
  ``n``-th frame one side sends mutated; the error must reach the online protocol.
* ``HEFixture``: a key set, a second key set, the server's view; ``envelope_layers``: where a
  mutation hits an envelope; ``forged`` / ``WRONG_PARAMETERS``: public contexts of other HE
  parameters, missing keys or parts, claiming the server's parameters.

Used by tests/fuzz/test_fuzz_inprocess.py and scripts/fuzz.py.
"""
from __future__ import annotations

import threading

import numpy as np

import fuzz_helpers as fh
from cryptogen.field import FixedPoint
from cryptogen.mpc.channel import channel_pair
from cryptogen.mpc.party import Party, share

FP = FixedPoint()
T = FP.t
CHAN_TIMEOUT = 20.0  # a receive that waits longer is a hang (no frame is dropped by these mutations)


def _protocols():
    from cryptogen.mpc.argmax import argmax_last, open_to_client
    from cryptogen.mpc.arith import mul_ss, open_
    from cryptogen.mpc.compare import drelu, trunc
    from cryptogen.mpc.gelu import gelu
    from cryptogen.mpc.layernorm import layernorm
    from cryptogen.mpc.softmax import softmax

    def argmax(p, x):
        best = argmax_last(p, x.reshape(2, 4))
        return open_to_client(p, best[1])

    # name -> (fn(party, share), real input shape); adding a protocol is one line
    return {
        "open": (lambda p, x: open_(p, x), (8,)),
        "mul": (lambda p, x: mul_ss(p, x, x), (8,)),
        "trunc": (lambda p, x: trunc(p, x, 12), (8,)),
        "drelu": (lambda p, x: drelu(p, x), (8,)),
        "gelu": (lambda p, x: gelu(p, x), (8,)),
        "softmax": (lambda p, x: softmax(p, x.reshape(2, 4), causal=True), (8,)),
        "layernorm": (lambda p, x: layernorm(p, x.reshape(2, 4)), (8,)),
        "argmax": (argmax, (8,)),
    }


PROTOCOLS = _protocols()
_FRAMES: dict = {}


def frame_count(protocol: str, sender: str) -> int:
    """How many frames ``sender`` sends in ``protocol`` (a dry run, cached)."""
    if (protocol, sender) not in _FRAMES:
        for role in ("client", "server"):
            _FRAMES[protocol, role] = run_pair(protocol, role, 1 << 30, "flip bytes")["frames"]
    return _FRAMES[protocol, sender]


def _two_threads(jobs: dict, chans: dict, timeout: float) -> dict:
    out, errs = {}, {}

    def run(role, fn):
        try:
            out[role] = fn()
        except BaseException as e:  # noqa: BLE001 - classified by the caller
            errs[role] = e
            ch = chans[role]
            (getattr(ch, "abort", None) or ch.close)()

    ths = {r: threading.Thread(target=run, args=(r, fn), daemon=True) for r, fn in jobs.items()}
    for th in ths.values():
        th.start()
    for r, th in ths.items():
        th.join(timeout)
        assert not th.is_alive(), f"the {r} hangs (over {timeout:.0f} s)"
    return {"out": out, "errs": errs}


def run_pair(protocol: str, sender: str, n: int, mutation: str, seed: int = 0) -> dict:
    """Run ``protocol`` with the ``n``-th frame ``sender`` sends replaced by ``mutation``.
    Returns {outcome, detectable, hit, receiver error}. AssertionError on a hang or an unclear error."""
    from cryptogen.mpc.provider import DealerProvider

    fn, shape = PROTOCOLS[protocol]
    rng = np.random.default_rng(seed)
    x = FP.encode(rng.uniform(-3, 3, shape))
    xc, xs = share(x)
    cc, sc = channel_pair(timeout=CHAN_TIMEOUT)
    provider = DealerProvider()
    parties = {"client": Party("client", cc, provider, FP), "server": Party("server", sc, provider, FP)}
    _two_threads({r: parties[r].handshake for r in parties}, {"client": cc, "server": sc}, 60)
    tap = fh.NthFrame(n, mutation, rng)
    fh.tap_send(parties[sender].chan, tap)
    res = _two_threads({"client": lambda: fn(parties["client"], xc), "server": lambda: fn(parties["server"], xs)},
                       {"client": cc, "server": sc}, 120)
    receiver = "server" if sender == "client" else "client"
    return _classify(res["errs"].get(receiver), tap.detectable(T), tap.hit) | {"frames": tap.seen}


def _classify(err, det: bool, hit: bool) -> dict:
    """The receiver's outcome; AssertionError if its error is unclear or a detectable frame passed."""
    if err is not None:
        why = fh.clear(err)
        assert why is None, why
        return {"outcome": f"error:{type(err).__name__}", "detectable": det, "hit": hit}
    assert not det, "a detectably malformed frame (dtype, shape, range or bytes) was accepted"
    return {"outcome": "finished", "detectable": det, "hit": hit}


# ---- HE ----------------------------------------------------------------------------------------
class HEFixture:
    """Client keys (rotation steps of a small linear layer), a foreign key set, the server's view."""

    def __init__(self, d_in: int = 16, d_out: int = 8):
        from cryptogen.he.convert import ClientRole
        from cryptogen.he.engine import ServerEngine
        from cryptogen.he.keys import ClientKeys, PublicContext
        from cryptogen.he.linear import EncodedLinear, plan_linear
        from cryptogen.he.params import HEConfig

        self.cfg = HEConfig()
        self.plan = plan_linear(d_in, d_out, self.cfg.n)
        self.keys = ClientKeys.generate(self.cfg, self.plan.rotation_steps())
        self.other = ClientKeys.generate(self.cfg, ())
        self.public = self.keys.public_context_bytes()
        self.ctx = PublicContext.from_bytes(self.public, self.cfg)
        self.engine = ServerEngine(self.ctx)
        self.role = ClientRole(self.keys)
        rng = np.random.default_rng(5)
        self.W = FP.encode(rng.uniform(-1, 1, (d_in, d_out)))
        self.enc = EncodedLinear(self.engine, self.W, self.plan)
        self.ct = self.keys.ct_to_bytes(self.keys.encrypt(np.arange(self.cfg.n) % 1000))

    def accept_server(self, data: bytes) -> None:
        """The server's receive path and a use of what it accepted (S2H add, rotation, export)."""
        from cryptogen.he.convert import s2h_server
        c = s2h_server(self.engine, data, np.zeros(self.cfg.n, np.int64))
        self.engine.export(self.engine.rotate(c, min(self.ctx.rotation_steps or (0,))))

    def accept_client(self, data: bytes) -> None:
        out = self.role.h2s_receive(data)
        assert out.shape == (self.cfg.n,) and out.dtype == np.int64 and out.min() >= 0 and out.max() < T


def envelope_layers():
    """Where a mutation hits an envelope (cryptogen/he/serialize.py): the sealed bytes as a whole
    (the checksum breaks), or, re-sealed with a valid checksum, the SEAL payload, the metadata
    JSON, or the fixed header (magic, version, kind, fingerprint, key id, metadata length)."""
    import hashlib
    import struct

    from cryptogen.he import serialize

    def seal(head: bytes, meta_b: bytes, body: bytes) -> bytes:
        out = head + meta_b + struct.pack("<Q", len(body)) + body
        return out + hashlib.sha256(out).digest()[:16]

    def parts(data):
        h = serialize._HEAD.size
        mlen = struct.unpack_from("<I", data, h - 4)[0]
        meta_b = data[h:h + mlen]
        body = data[h + mlen + 8:-16]
        return data[:h], meta_b, body

    def whole(data, mutate):
        return mutate(data)

    def payload(data, mutate):
        head, meta_b, body = parts(data)
        return seal(head, meta_b, mutate(body))

    def meta(data, mutate):
        head, meta_b, body = parts(data)
        new = mutate(meta_b)
        return seal(head[:-4] + struct.pack("<I", len(new)), new, body)

    def header(data, mutate):
        head, meta_b, body = parts(data)
        new = mutate(head)[: len(head)].ljust(len(head), b"\0")
        return seal(new, meta_b, body)

    return {"whole": whole, "payload": payload, "meta": meta, "header": header}


def run_linear(he: HEFixture, sender: str, n: int, mutation: str, seed: int = 0) -> dict:
    """One HE linear step (cryptogen/twoparty.py) with the ``n``-th frame ``sender`` sends mutated."""
    from cryptogen.twoparty import linear_client, linear_server

    rng = np.random.default_rng(seed)
    x = FP.encode(rng.uniform(-1, 1, he.plan.d_in))
    xc, xs = share(x)
    cc, sc = channel_pair(timeout=CHAN_TIMEOUT)
    tap = fh.NthFrame(n, mutation, rng)
    fh.tap_send(cc if sender == "client" else sc, tap)
    res = _two_threads({"client": lambda: linear_client(cc, he.role, he.plan, xc),
                        "server": lambda: linear_server(sc, he.engine, he.enc, xs)},
                       {"client": cc, "server": sc}, 120)
    receiver = "server" if sender == "client" else "client"
    return _classify(res["errs"].get(receiver), tap.detectable(T), tap.hit) | {"frames": tap.seen}


# ---- public contexts of wrong HE parameters ----------------------------------------------------------
def forged(cfg, *, sec=128, patch_sec=None, steps=(), claim_steps=None, drop=None, n_blobs=4, config=None,
            **params):
    """A SEAL context of other parameters (or the server's) wrapped in an envelope that claims the
    server's HEConfig (the project's own helpers build it)."""
    import struct

    from Pyfhel import Pyfhel

    from cryptogen.he import serialize
    from cryptogen.he.keys import _key_id
    he = Pyfhel()
    kw = {"n": cfg.n, "t": cfg.t, "qi": list(cfg.expected_qi)} | params
    assert str(he.contextGen(scheme="bfv", sec=sec, **kw)).startswith("success")
    he.keyGen()
    he.relinKeyGen()
    if steps:
        he.rotateKeyGen(list(steps))
    ctx_b = he.to_bytes_context("none")
    if patch_sec is not None:
        ctx_b = struct.pack("<i", patch_sec) + ctx_b[4:]
    blobs = [ctx_b, he.to_bytes_public_key("none"), he.to_bytes_relin_key("none"),
             he.to_bytes_rotate_key("none") if steps else b""]
    if drop is not None:
        blobs[drop] = b""
    blobs = (blobs + [b"x"] * 4)[:n_blobs]
    meta = {"config": config or cfg.to_dict(), "rotation_steps": list(steps if claim_steps is None else claim_steps),
            "qi": list(cfg.expected_qi)}
    return serialize.pack("public_context", cfg.fingerprint, _key_id(blobs[1]), meta, serialize.join_blobs(blobs))


WRONG_PARAMETERS = {
    "other N": dict(sec=0, patch_sec=128, n=8192, qi_sizes=[45, 45, 45, 45, 38], qi=[]),
    "other primes": dict(sec=0, patch_sec=128, qi_sizes=[50, 50, 50, 50, 60], qi=[]),
    "other t": dict(sec=0, patch_sec=128, t_bits=40, t=0),
    "SEAL check off (sec=0)": dict(sec=0),
    "missing Galois keys": dict(steps=(1,), claim_steps=(1, 2, 4, 0)),
    "no Galois keys at all": dict(claim_steps=(1,)),
    "no relinearisation key": dict(drop=2),
    "no public key": dict(drop=1),
    "three parts": dict(n_blobs=3),
    "five parts": dict(n_blobs=5),
    "other flooding policy": dict(config="flood_sigma"),
    "unknown config field": dict(config="extra"),
}




def wrong_parameters(cfg, case: str) -> bytes:
    """The envelope of ``WRONG_PARAMETERS[case]``, claiming ``cfg``."""
    kw = dict(WRONG_PARAMETERS[case])
    if kw.get("config") == "flood_sigma":
        kw["config"] = cfg.to_dict() | {"flood_sigma": 41}
    elif kw.get("config") == "extra":
        kw["config"] = cfg.to_dict() | {"extra": 1}
    return forged(cfg, **kw)


# ---- the dealer-free provider's offline link (mpc/pool.py, mpc/provider_he.py) ---------------------------
def run_offline(sender: str, n: int, mutation: str, seed: int = 0) -> dict:
    """Both parties run a Beaver multiplication whose triples the HE provider makes over its own offline
    link (in-memory pair); the ``n``-th frame ``sender`` sends on that link is mutated. The mutation
    must surface as a clear error to the online protocol (ProviderError naming the cause), in time."""
    from cryptogen.mpc.arith import mul_ss
    from cryptogen.mpc.provider_he import HEProvider

    rng = np.random.default_rng(seed)
    x = FP.encode(rng.uniform(-3, 3, 8))
    xc, xs = share(x)
    cc, sc = channel_pair(timeout=CHAN_TIMEOUT)
    oc, os_ = channel_pair(timeout=CHAN_TIMEOUT)
    tap = fh.NthFrame(n, mutation, rng)
    fh.tap_send(oc if sender == "client" else os_, tap)
    provider = HEProvider(offline=(oc, os_), lookahead=0, stall_timeout=CHAN_TIMEOUT + 10)
    parties = {"client": Party("client", cc, provider, FP), "server": Party("server", sc, provider, FP)}
    try:
        _two_threads({r: parties[r].handshake for r in parties}, {"client": cc, "server": sc}, 60)
        res = _two_threads({"client": lambda: mul_ss(parties["client"], xc, xc),
                            "server": lambda: mul_ss(parties["server"], xs, xs)}, {"client": cc, "server": sc}, 120)
    finally:
        provider.close()
    receiver = "server" if sender == "client" else "client"
    err = res["errs"].get(receiver)
    cause = provider.sources[receiver]._error or ""
    if err is not None and "failed: " in cause and ":" not in cause.split("failed: ", 1)[1]:
        raise AssertionError(f"the {receiver}'s producer failed with a non-project exception: {cause}")
    # an offline frame carries a ciphertext, a blob part or a header: a changed byte may be caught
    # only by a later check, so the outcome is recorded, not required
    return _classify(err, False, tap.hit) | {"frames": tap.seen, "cause": cause[:120]}
