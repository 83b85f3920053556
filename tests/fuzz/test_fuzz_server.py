"""Fuzz against a real ``cryptogen serve`` (its own process, embedded Ray): mutated control messages
of every type (hypothesis sequences with replays), public contexts of wrong HE parameters, bad
messages in the middle of a session, and mutated data-link frames both ways (a malicious client
against the server's workers, a malicious server against the real client). Every case ends with an
``error`` reply or a project error with a one-line message, within a time bound; the server process
stays up and logs no crash; honest generations run on other connections the whole time and give
plaintext greedy's tokens."""
import collections

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_helpers as fh
import inproc_fuzz as ip
import server_fuzz as sf

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def honest(fuzz_server, fuzz_greedy):
    """Honest generations (their own key set) for as long as this module fuzzes the server."""
    from tiny import TINY

    from cryptogen import secure_plan as sp
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    from cryptogen.plan import make_plan
    cfg = HEConfig()
    keys = ClientKeys.generate(cfg, sp.rotation_steps(TINY, make_plan(TINY.n_layer, TINY.n_head, TINY.d_ff, 1), cfg.n))
    prompt = [42, 7, 19]
    loop = fh.HonestLoop(fuzz_server.conn_file, prompt, 2, fuzz_greedy(prompt, 2), keys=keys,
                         dealer_file=fuzz_server.dealer_file)
    yield loop
    loop._stop.set()
    loop._thread.join(300)  # before the server stops


KNOWN = collections.Counter()  # crashes of fh.KNOWN_SERVER_ISSUES the hypothesis cases ran into


@pytest.fixture()
def alive(fuzz_server, honest):
    fh.server_alive(fuzz_server)
    yield
    fh.server_alive(fuzz_server)


# ---- control messages on fresh connections ------------------------------------------------------------
@st.composite
def control_sequences(draw, env):
    """A start (nothing, the right hello, a hello with a wrong key), then 1-3 frames: mutated
    messages of any client type, garbage blobs, or replays of an earlier frame."""
    frames, labels = [], []
    start = draw(st.sampled_from(["none", "hello", "hello", "wrong key"]))
    if start != "none":
        key = env["api_key"] if start == "hello" else "0" * 64
        frames.append(fh.encode({"type": "hello", "api_key": key, "version": fh.control.VERSION}))
        labels.append(start)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["message", "message", "message", "replay", "blob"]))
        if how == "replay" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            frames.append(frames[i])
            labels.append(f"replay {labels[i]}")
        elif how == "blob":
            frames.append(np.frombuffer(draw(st.binary(max_size=64)), np.uint8))
            labels.append("blob")
        else:
            label, frame = draw(fh.message_strategy(fh.CLIENT_MESSAGES, env))
            frames.append(frame)
            labels.append(label)
    return labels, frames


@pytest.mark.usefixtures("alive")
def test_control_message_sequences(fuzz_server, fuzz_cases):
    env = {"api_key": sf.info(fuzz_server)["api_key"], "sid": "ab" * 16, "secret": "cd" * 32}
    outcomes = []

    @settings(max_examples=30, **SETTINGS)
    @given(case=control_sequences(env))
    def run(case):
        labels, frames = case
        fuzz_cases["server: control sequences"] += 1
        outcomes.append((labels, sf.control_case(fuzz_server, frames)))
        fh.server_alive(fuzz_server, KNOWN)
    run()
    assert any(o.startswith("error:bad_request") for _, o in outcomes)
    print(f"known server issues hit: {dict(KNOWN)}")


# ---- the public context (open) ------------------------------------------------------------------------
def _flipped(keys):
    b = bytearray(keys.public_context_bytes())
    b[len(b) // 2] ^= 4
    return bytes(b)


CONTEXTS = {  # name -> function(genuine keys) -> the blob sent after ``open``
    # "genuine minus one Galois key": the tiny model's kernels use none since the folds moved to the
    # share domain; tests/server/test_shard_unit.py checks it on a shape whose kernels need them
    "other N": lambda keys: ip.wrong_parameters(keys.config, "other N"),
    "other flooding policy": lambda keys: ip.wrong_parameters(keys.config, "other flooding policy"),
    "claims Galois keys it lacks": lambda keys: ip.wrong_parameters(keys.config, "missing Galois keys"),
    "genuine with a flipped byte": _flipped,
    "genuine truncated": lambda keys: keys.public_context_bytes()[: 5 << 20],
    "empty": lambda keys: b"",
}


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize("case", sorted(CONTEXTS))
def test_public_context_is_checked(fuzz_server, tiny_keys, fuzz_cases, case):
    fuzz_cases["server: public contexts"] += 1
    outcome = sf.context_case(fuzz_server, CONTEXTS[case](tiny_keys))
    assert outcome == "error:bad_request", outcome


# ---- in the middle of a session -------------------------------------------------------------------------
MID = ["forward start out of range", "forward T a bool", "replayed open", "resume with a foreign sid",
       "replayed forward"]  # scripts/fuzz.py runs every entry of server_fuzz.MID_SESSION


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize("action", MID)
def test_bad_message_mid_session(fuzz_server, tiny_keys, fuzz_cases, action):
    fuzz_cases["server: mid-session messages"] += 1
    outcome = sf.session_case(fuzz_server, tiny_keys, action)
    assert outcome == "error:bad_request", outcome


@pytest.mark.parametrize("name", sorted(fh.FOUND_SERVER_ISSUES))
def test_found_server_issue_stays_fixed(fuzz_server, tiny_keys, honest, fuzz_cases, name):
    """Deterministic reproducers of what the fuzz found (and was fixed: the entry says how): a bad
    frame mid-session must get ``error: bad_request`` and crash nothing."""
    fuzz_cases["server: found-issue reproducers"] += 1
    fh.server_alive(fuzz_server)
    outcome = sf.session_case(fuzz_server, tiny_keys, {"deep JSON nesting": "deep nesting"}[name])
    fh.server_alive(fuzz_server, settle=1.0)
    assert outcome == "error:bad_request", outcome


# ---- data links --------------------------------------------------------------------------------------
LINKS = [  # (direction, which frame, mutation); scripts/fuzz.py runs server_fuzz.LINK_CASES
    ("to server", "ciphertext", "reseal corrupt payload"),
    ("to server", "ciphertext", "duplicate"),
    ("to client", "ciphertext", "flip bytes"),
    ("to client", "share", "out of field range"),
]


@pytest.fixture(scope="module")
def other_keys():
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    return ClientKeys.generate(HEConfig(), ())


@pytest.mark.usefixtures("alive")
@pytest.mark.parametrize("direction, pick, mutation", LINKS, ids=[" ".join(c) for c in LINKS])
def test_mutated_data_link_frame(fuzz_server, tiny_keys, other_keys, fuzz_cases, direction, pick, mutation):
    fuzz_cases["server: data-link frames"] += 1
    mut = sf.foreign_ct(other_keys) if mutation == "foreign key" else mutation
    outcome = sf.link_case(fuzz_server, tiny_keys, direction, pick, mut)["outcome"]
    if mutation != "duplicate":  # a duplicated frame shifts the stream: caught later, or not at all
        assert outcome.startswith("error:"), outcome


def test_honest_sessions_finished_meanwhile(fuzz_server, honest):
    """Last: the honest generations that ran during the fuzz all gave greedy's tokens."""
    n = honest.stop()
    print(f"{n} honest generations during the fuzz")
    fh.server_alive(fuzz_server)
