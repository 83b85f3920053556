"""The server against the client's control path: a fake server (``FakeServer``: the project's TLS
certificate helpers) answers the real client's ``hello`` / ``open`` with mutated ``welcome``,
``session``, ``error`` or ``retry`` frames (hypothesis). ``Connection`` + ``generate`` must end
with a project error (ConnectError, RemoteError, ProtocolError, ... : ValueError/RuntimeError
subclasses) whose message is one line, in time; never another exception type or a hang.

Issues the fuzz found are in ``FOUND_ISSUES``, each with its fix and a deterministic reproducer that
now passes; ``KNOWN_ISSUES`` (tolerated by the hypothesis test, each an xfail reproducer) is empty."""
import pytest
from hypothesis import HealthCheck, given, settings

import client_fuzz as cf
import fuzz_helpers as fh

pytestmark = pytest.mark.fuzz
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

FOUND_ISSUES = {
    "welcome fields unchecked": dict(
        match=lambda phase, kind, err: phase == "welcome" and kind == "welcome" and not fh.project_error(err),
        frame=lambda env: fh.encode({"type": "welcome", **fh.SERVER_MESSAGES["welcome"](env), "workers": None}),
        phase="welcome",
        fix="client/remote.py Connection.__init__: validate the welcome before use (model and he dicts, workers "
            "and layer_groups ints in range, tokenizer str or None) and turn KeyError/TypeError/ValueError/"
            "AttributeError and tokenizers' Exception from GPTConfig.from_hf, HEConfig.from_dict, make_plan, "
            "Tokenizer.from_str into ConnectError('the server sent a malformed welcome (<field>)')"),
    "session links unchecked": dict(
        match=lambda phase, kind, err: phase == "session" and kind in ("session", "retry")
        and not fh.project_error(err),
        frame=lambda env: fh.encode({"type": "session", **fh.SERVER_MESSAGES["session"](env),
                                     "links": [{"worker": 0}]}),
        phase="session",
        fix="client/remote.py _Session.__enter__/_open_links (and _relink for 'retry'): check msg['links'] is a "
            "list of dicts with int worker in range, str host, int port in 1..65535, a dict of str tokens with "
            "'online' (and 'offline' for provider he); else raise control.ProtocolError('the server sent "
            "malformed links')"),
    "deep JSON nesting": dict(
        match=lambda phase, kind, err: isinstance(err, RecursionError),
        frame=lambda env: fh.RAW_CONTROL["deep nesting"],
        phase="welcome",
        fix="cryptogen/net/control.py recv: catch RecursionError from json.loads with the ValueError "
            "('a control message is not valid JSON'); the gateway's control.recv has the same bug"),
    "error message not one line": dict(
        match=lambda phase, kind, err: kind == "error" and fh.project_error(err) and not fh.one_line(str(err)),
        frame=lambda env: fh.encode({"type": "error", "code": "session", "message": "line one\nline two"}),
        phase="welcome",
        fix="cryptogen/net/control.py recv: build RemoteError from a sanitised message (a str, control "
            "characters and newlines replaced by spaces, stripped, 'unknown error' if empty) and a str code"),
}

KNOWN_ISSUES: dict = {}  # found and not fixed: none


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    links = cf.link_listener(tmp_path_factory.mktemp("fake-links"))
    srv = fh.FakeServer(tmp_path_factory.mktemp("fake-server"))
    srv.env = cf.env_for(links.port)
    yield srv
    srv.close()
    links.close()


@pytest.fixture(scope="module")
def keys():
    """Keys of the default parameters whose public context is a stand-in (the fake server ignores it)."""
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    k = ClientKeys.generate(HEConfig(), ())
    k.public_context_bytes = lambda: b"public context"
    return k


def sent_type(frame) -> str | None:
    """The ``type`` of the control message in ``frame`` as the client reads it (None: no message)."""
    import json
    try:
        msg = json.loads(frame.tobytes())
    except (ValueError, RecursionError):
        return None
    return msg.get("type") if isinstance(msg, dict) else None


def known_issue(phase, frame, err) -> str | None:
    kind = sent_type(frame)
    for name, issue in KNOWN_ISSUES.items():
        if issue["match"](phase, kind, err):
            return name
    return None


def _check(phase, label, frame, err, seen):
    if err is None:
        return "finished"
    why = fh.clear(err)
    if why is None:
        return f"error:{type(err).__name__}"
    name = known_issue(phase, frame, err)
    if name is not None:
        seen[name] = seen.get(name, 0) + 1
        return f"known:{name}"
    raise AssertionError(f"{phase} <- {label}: {why}")


@pytest.mark.parametrize("phase, types, examples", [
    ("welcome", ["welcome", "error"], 60),
    ("session", ["session", "error", "retry", "done"], 40),
])
def test_mutated_server_replies(fake, keys, fuzz_cases, phase, types, examples):
    seen = {}

    @settings(max_examples=examples, **SETTINGS)
    @given(case=fh.message_strategy(fh.SERVER_MESSAGES, fake.env, types))
    def run(case):
        label, frame = case
        fuzz_cases[f"client: {phase} replies"] += 1
        fake.script = cf.control_script(phase, frame, fake.env)
        _check(phase, label, frame, cf.run_client(fake, keys), seen)
    run()
    print(f"known issues hit ({phase}): {seen}")


@pytest.mark.parametrize("name", sorted(FOUND_ISSUES))
def test_found_issue_stays_fixed(fake, keys, fuzz_cases, name):
    issue = FOUND_ISSUES[name]
    fuzz_cases["client: found-issue reproducers"] += 1
    fake.script = cf.control_script(issue["phase"], issue["frame"](fake.env), fake.env)
    err = cf.run_client(fake, keys)
    assert err is not None and fh.clear(err) is None, fh.clear(err)


def test_out_of_range_prompt_ids_fail_before_any_session(fake, keys, fuzz_cases):
    """An out-of-range token id is the client's own input: refused before ``open`` (the server never
    sees token ids, only ciphertexts of their one-hots)."""
    from cryptogen.client import remote
    fuzz_cases["client: out-of-range prompt ids"] += 1
    opened = []

    def script(chan):
        fh.control.recv(chan, "hello")
        fh.control.send(chan, "welcome", **fh.SERVER_MESSAGES["welcome"](fake.env))
        while True:
            msg = fh.control.recv(chan)
            if msg["type"] == "open":
                opened.append(msg)
                fh.control.recv_blob(chan, 1 << 30, "public context")
                fh.control.send_error(chan, "busy", "busy; retry after 30 s", retry_after=30)
            if msg["type"] == "close":
                return
    fake.script = script
    c = remote.Connection(fake.info(), timeout=10.0)
    c._keys = keys
    errors = []
    try:
        for ids in ([256], [1, -1], [10 ** 20]):
            try:
                list(c.generate(ids, 1))
            except Exception as e:  # noqa: BLE001 - checked below
                errors.append(e)
    finally:
        c.close()
    assert len(errors) == 3 and all(fh.one_line(str(e)) for e in errors), errors
    assert not opened, "a session was opened for out-of-range prompt ids"
    assert all(isinstance(e, ValueError) for e in errors), errors
