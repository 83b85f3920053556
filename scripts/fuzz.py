#!/usr/bin/env python
"""Protocol fuzz, the bigger run of tests/fuzz (issue #13): every message type of the protocol
replaced, truncated, corrupted or replayed, from the client against the server and from the server
against the client. Writes the number of cases and their outcomes to docs/bench/fuzz.json.

Groups (the suite runs each with few cases; this script with ``--cases`` split over them):
  inprocess/ciphertext      ciphertext envelopes (whole, re-sealed payload / metadata / header), both sides
  inprocess/context         public-context bytes and metadata (client -> server)
  inprocess/parameters      public contexts of wrong HE parameters (every entry of WRONG_PARAMETERS)
  inprocess/linear          frames of the HE linear step (twoparty.py), both directions
  inprocess/mpc             frames of the 2PC protocols (mpc/), both directions
  inprocess/offline         frames of the dealer-free provider's offline link (pool.py), both directions
  client/control            mutated welcome / session / error / retry against the real client (fake server)
  server/control            mutated control-message sequences against a real ``cryptogen serve``
  server/context            wrong public contexts at ``open``
  server/session            mutated messages in the middle of a real session
  server/links              one data-link frame mutated in a real step, both directions
while honest generations run against the same server and must give plaintext greedy's tokens.

A case passes when the receiving side ends with a project error whose message is one line (or an
``error`` reply), in time, or finishes where the mutation is indistinguishable from honest bytes;
the server process must stay up. Failures are recorded (not shrunk) and the run goes on.

    .venv/bin/python scripts/fuzz.py --cases 2000            # everything, ~1/3 of the cases in process
    .venv/bin/python scripts/fuzz.py --cases 300 --no-server  # in process and fake server only
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz")]

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import client_fuzz as cf  # noqa: E402
import fuzz_helpers as fh  # noqa: E402
import inproc_fuzz as ip  # noqa: E402

SHARES = {  # of --cases; the server groups are slower per case
    "inprocess/ciphertext": 0.13, "inprocess/context": 0.06, "inprocess/linear": 0.05, "inprocess/mpc": 0.17,
    "inprocess/offline": 0.05,
    "client/control": 0.2, "server/control": 0.2, "server/links": 0.13,
}


class Group:
    def __init__(self, name: str):
        self.name, self.cases, self.outcomes, self.failures = name, 0, collections.Counter(), []
        self.known = collections.Counter()
        self.seconds = self.slowest = 0.0

    def run(self, label: str, fn) -> None:
        self.cases += 1
        t0 = time.monotonic()
        try:
            out = fn()
            self.outcomes[str(out if isinstance(out, str) else out.get("outcome", out))[:80]] += 1
        except AssertionError as e:
            self.outcomes["FAILED"] += 1
            self.failures.append({"case": label[:300], "why": str(e)[:500]})
        except Exception as e:  # noqa: BLE001 - the harness itself; recorded
            self.outcomes["HARNESS ERROR"] += 1
            self.failures.append({"case": label[:300], "why": f"harness: {type(e).__name__}: {e}"[:500],
                                  "trace": traceback.format_exc()[-1500:]})
        finally:
            dt = time.monotonic() - t0
            self.seconds += dt
            self.slowest = max(self.slowest, dt)

    def report(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 1), "slowest_case_s": round(self.slowest, 1),
                "outcomes": dict(self.outcomes.most_common()), "known_issues": dict(self.known),
                "failures": self.failures}


def hyp(n: int, seed: int):
    return settings(max_examples=max(1, n), deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


def expect(fn, must_fail: bool):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        why = fh.clear(e)
        assert why is None, why
        return f"error:{type(e).__name__}"
    assert not must_fail, "malformed bytes were accepted"
    return "accepted"


# ---- in process ---------------------------------------------------------------------------------
def run_inprocess(groups: dict, n: dict) -> None:
    import test_fuzz_inprocess as tfi
    from cryptogen.he.keys import ClientKeys, PublicContext
    from cryptogen.he.params import HEConfig

    he = ip.HEFixture()
    g = groups.setdefault("inprocess/ciphertext", Group("inprocess/ciphertext"))

    @hyp(n["inprocess/ciphertext"], 0)
    @given(layer=st.sampled_from(["whole", "payload", "meta", "header"]), mutation=fh.byte_mutation(),
           side=st.sampled_from(["server", "client"]))
    def ct(layer, mutation, side):
        data = ip.envelope_layers()[layer](he.ct, mutation[1])
        accept = he.accept_server if side == "server" else he.accept_client
        g.run(f"{side} {layer} {mutation[0]}", lambda: expect(lambda: accept(data), layer in ("whole", "header")
                                                                and data != he.ct))
    ct()
    foreign = tfi._foreign(he)
    for case in tfi.FOREIGN:
        for side in ("server", "client"):
            accept = he.accept_server if side == "server" else he.accept_client
            g.run(f"{side} foreign {case}", lambda: expect(lambda: accept(foreign[case]), True))

    g = groups.setdefault("inprocess/context", Group("inprocess/context"))
    keys = ClientKeys.generate(HEConfig(), (1,))
    blob = keys.public_context_bytes()

    @hyp(n["inprocess/context"] // 2, 1)
    @given(layer=st.sampled_from(["whole", "meta", "context", "public key", "relin key", "galois keys"]),
           mutation=fh.byte_mutation())
    def ctx_bytes(layer, mutation):
        data = tfi._context_layer(blob, layer, mutation[1])
        g.run(f"{layer} {mutation[0]}", lambda: expect(lambda: tfi._use(PublicContext.from_bytes(data, HEConfig())),
                                                       layer == "whole" and data != blob))
    ctx_bytes()

    @hyp(n["inprocess/context"] // 2, 2)
    @given(key=st.sampled_from(["config", "rotation_steps", "qi", "extra"]),
           sub=st.sampled_from(["n", "t", "qi_sizes", "flood_sigma", "security_bits", "frac_bits", "whole"]),
           value=st.sampled_from(fh.FIELD_VALUES + [[1, 2, 3], [8192], [-1], list(range(40))]))
    def ctx_meta(key, sub, value):
        from cryptogen.he import serialize
        meta, payload, fp, kid = serialize.unpack(blob, "public_context")
        if key == "config" and sub != "whole":
            meta["config"][sub] = value
        else:
            meta[key] = value
        data = serialize.pack("public_context", fp, kid, meta, payload)
        must = key == "config" or (key == "rotation_steps" and meta.get("rotation_steps") not in ([], [1]))
        g.run(f"meta {key} {sub} {str(value)[:30]}",
              lambda: expect(lambda: tfi._use(PublicContext.from_bytes(data, HEConfig())), must))
    ctx_meta()

    g = groups.setdefault("inprocess/parameters", Group("inprocess/parameters"))
    for case in sorted(ip.WRONG_PARAMETERS):
        g.run(case, lambda: expect(lambda: PublicContext.from_bytes(ip.wrong_parameters(HEConfig(), case),
                                                                    HEConfig()), True))

    g = groups.setdefault("inprocess/linear", Group("inprocess/linear"))

    @hyp(n["inprocess/linear"], 3)
    @given(sender=st.sampled_from(["client", "server"]), where=st.floats(0, 1, exclude_max=True),
           mutation=st.sampled_from(fh.FRAME_KINDS), seed=st.integers(0, 2 ** 16))
    def linear(sender, where, mutation, seed):
        frames = 1 if sender == "client" else he.plan.decode_outputs
        g.run(f"{sender} frame {int(where * frames)} {mutation}",
              lambda: ip.run_linear(he, sender, int(where * frames), mutation, seed))
    linear()

    g = groups.setdefault("inprocess/mpc", Group("inprocess/mpc"))

    @hyp(n["inprocess/mpc"], 4)
    @given(protocol=st.sampled_from(sorted(ip.PROTOCOLS)), sender=st.sampled_from(["client", "server"]),
           where=st.floats(0, 1, exclude_max=True), mutation=st.sampled_from(fh.FRAME_KINDS),
           seed=st.integers(0, 2 ** 16))
    def mpc(protocol, sender, where, mutation, seed):
        k = int(where * ip.frame_count(protocol, sender))
        g.run(f"{protocol} {sender} frame {k} {mutation}", lambda: ip.run_pair(protocol, sender, k, mutation, seed))
    mpc()

    g = groups.setdefault("inprocess/offline", Group("inprocess/offline"))

    @hyp(n["inprocess/offline"], 5)
    @given(sender=st.sampled_from(["client", "server"]), k=st.integers(0, 5), mutation=st.sampled_from(fh.FRAME_KINDS),
           seed=st.integers(0, 2 ** 16))
    def offline(sender, k, mutation, seed):
        g.run(f"{sender} frame {k} {mutation}", lambda: ip.run_offline(sender, k, mutation, seed))
    offline()


# ---- the real client against a fake server ------------------------------------------------------
def run_client(groups: dict, n: int, tmp: Path) -> None:
    import test_fuzz_client_control as tcc
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig

    g = groups.setdefault("client/control", Group("client/control"))
    links = cf.link_listener(tmp / "links")
    fake = fh.FakeServer(tmp / "fake")
    env = cf.env_for(links.port)
    keys = ClientKeys.generate(HEConfig(), ())
    keys.public_context_bytes = lambda: b"public context"
    phases = (("welcome", ["welcome", "error"], 0.5), ("session", ["session", "error", "retry", "done"], 0.5))
    for phase, types, share in phases:
        @hyp(int(n * share), 5)
        @given(case=fh.message_strategy(fh.SERVER_MESSAGES, env, types))
        def one(case):
            label, frame = case
            fake.script = cf.control_script(phase, frame, env)

            def body():
                err = cf.run_client(fake, keys)
                if err is None:
                    return "finished"
                why = fh.clear(err)
                if why is None:
                    return f"error:{type(err).__name__}"
                name = tcc.known_issue(phase, frame, err)
                if name is not None:
                    g.known[name] += 1
                    return f"known issue: {name}"
                raise AssertionError(f"{phase} <- {label}: {why}")
            g.run(f"{phase} <- {label}", body)
        one()
    fake.close()
    links.close()


# ---- a real server ------------------------------------------------------------------------------------
def run_server(groups: dict, n: dict, tmp: Path) -> dict:
    import test_fuzz_server as tfs
    from tiny import greedy, save_tiny

    import server_fuzz as sf
    from cryptogen import secure_plan as sp
    from cryptogen.dealer.service import DealerServer
    from cryptogen.he.keys import ClientKeys
    from cryptogen.he.params import HEConfig
    from cryptogen.model import GPT
    from cryptogen.plan import make_plan
    from tiny import TINY

    folder = save_tiny(tmp / "tiny")
    dealer = DealerServer(listen="127.0.0.1:0", state_dir=str(tmp / "dealer" / "state"),
                          out_dir=str(tmp / "dealer")).start()
    srv = fh.server_harness().ServerProcess(folder, tmp, workers=1, max_sessions=16, dealer=dealer)
    srv.dealer_file = dealer.client_file
    model = GPT.from_pretrained(folder).eval()
    cfg = HEConfig()
    steps = sp.rotation_steps(TINY, make_plan(TINY.n_layer, TINY.n_head, TINY.d_ff, 1), cfg.n)
    keys, honest_keys, other = (ClientKeys.generate(cfg, steps), ClientKeys.generate(cfg, steps),
                                ClientKeys.generate(cfg, ()))
    blob = keys.public_context_bytes()
    keys.public_context_bytes = lambda: blob
    prompt = [42, 7, 19]
    honest = fh.HonestLoop(srv.conn_file, prompt, 2, greedy(model, prompt, 2), keys=honest_keys,
                           dealer_file=dealer.client_file)
    out = {}
    try:
        g = groups.setdefault("server/control", Group("server/control"))
        env = {"api_key": sf.info(srv)["api_key"], "sid": "ab" * 16, "secret": "cd" * 32}

        @hyp(n["server/control"], 6)
        @given(case=tfs.control_sequences(env))
        def control(case):
            labels, frames = case

            def body():
                o = sf.control_case(srv, frames)
                fh.server_alive(srv, g.known)
                return o
            g.run(" | ".join(labels), body)
        control()

        g = groups.setdefault("server/context", Group("server/context"))
        for case in sorted(tfs.CONTEXTS):
            def body(case=case):
                o = sf.context_case(srv, tfs.CONTEXTS[case](keys))
                fh.server_alive(srv, g.known)
                assert o == "error:bad_request", o
                return o
            g.run(case, body)

        g = groups.setdefault("server/session", Group("server/session"))
        for action in sf.MID_SESSION_ACTIONS:
            def body(action=action):
                o = sf.session_case(srv, keys, action)
                before = sum(g.known.values())
                fh.server_alive(srv, g.known)
                if sum(g.known.values()) > before:
                    return f"known issue ({o})"
                assert o.startswith("error:"), o
                return o
            g.run(action, body)

        g = groups.setdefault("server/links", Group("server/links"))
        cases = list(sf.LINK_CASES)
        rng = np.random.default_rng(7)
        extra = max(0, n["server/links"] - len(cases))
        cases += [cases[i] for i in rng.integers(0, len(cases), extra)]  # again, other frames / seeds
        for i, (direction, pick, mutation) in enumerate(cases[: max(n["server/links"], 1)]):
            k = 0 if i < len(sf.LINK_CASES) else int(rng.integers(0, 6))

            def body(direction=direction, pick=pick, mutation=mutation, k=k, i=i):
                mut = sf.foreign_ct(other) if mutation == "foreign key" else mutation
                o = sf.link_case(srv, keys, direction, pick, mut, n=k, seed=i)
                fh.server_alive(srv, g.known)
                return o
            g.run(f"{direction} {pick} #{k} {mutation}", body)

        g = groups.setdefault("server/honest", Group("server/honest"))
        g.run("honest generations during the fuzz", lambda: f"{honest.stop()} finished, all equal to greedy")
        out["honest_generations"] = len(honest.results)
    finally:
        honest._stop.set()
        srv.stop()
        dealer.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=600, help="hypothesis examples, split over the groups")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "fuzz.json"))
    ap.add_argument("--no-server", action="store_true", help="skip the groups against a real cryptogen serve")
    args = ap.parse_args()
    import test_fuzz_client_control as tcc
    n = {k: int(v * args.cases) for k, v in SHARES.items()}
    groups: dict[str, Group] = {}
    extra = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cryptogen-fuzz-") as tmp:
        tmp = Path(tmp)
        for name, fn in (("in process", lambda: run_inprocess(groups, n)),
                         ("client", lambda: run_client(groups, n["client/control"], tmp)),
                         ("server", None if args.no_server else lambda: extra.update(run_server(groups, n, tmp)))):
            if fn is None:
                continue
            print(f"[fuzz] {name} ...", flush=True)
            before = set(groups)
            fn()
            for g in groups.values():
                if g.name not in before:
                    print(f"[fuzz]   {g.name:22s} {g.cases:5d} cases, {len(g.failures)} failed, {g.seconds:.0f} s",
                          flush=True)
    report = {
        "command": "scripts/fuzz.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cases": sum(g.cases for g in groups.values()),
        "failed": sum(len(g.failures) for g in groups.values()),
        "seconds": round(time.monotonic() - t0, 1),
        **extra,
        "groups": {name: g.report() for name, g in groups.items()},
        "message_types": {"client -> server": sorted(fh.CLIENT_MESSAGES),
                          "server -> client": sorted(fh.SERVER_MESSAGES)},
        "frame_mutations": fh.FRAME_KINDS,
        "known_issues_open": {**{k: v["fix"] for k, v in tcc.KNOWN_ISSUES.items()},
                              **{f"server: {k}": v[1] for k, v in fh.KNOWN_SERVER_ISSUES.items()}},
        "found_issues_fixed": {**{k: v["fix"] for k, v in getattr(tcc, "FOUND_ISSUES", {}).items()},
                               **{f"server: {k}": v[1] for k, v in getattr(fh, "FOUND_SERVER_ISSUES", {}).items()}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[fuzz] {report['cases']} cases, {report['failed']} failed, {report['seconds']:.0f} s -> {args.out}")
    for g in groups.values():
        for f in g.failures[:5]:
            print(f"[fuzz] FAILED {g.name}: {f['case']}: {f['why']}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
