#!/usr/bin/env python
"""Mutation check of the security tests: break privacy on purpose, expect a test to fail.

Each mutation is one exact text replacement in one source file (the snippet must occur exactly
once, else this script stops before running anything: update the snippet when the code moves).
For each mutation the repository is copied to a temporary folder (without .venv, .git, caches),
the replacement applied to the COPY, and the security tests (tests/security) run there with this
repository's venv python. The working tree is never modified.

Making sure the copy is what gets imported: the venv has an editable install of ``cryptogen``
whose finder maps ``cryptogen`` and its top-level folders (client/, workers/, scheduler/, ...) to
this repository. The run goes through a small boot file that puts the copy first on sys.path,
points the editable finder's MAPPING at the copy, and asserts that every imported ``cryptogen``
module lives in the copy; bytecode is not written (no stale .pyc across mutations). Two controls
run first: the unmutated copy must pass, and a sanity mutation that only falsifies what the test
hook records (not the protocol) must fail -- proof that the copy's code is the code under test.

A mutation counts as caught when at least one test FAILS (an assertion); tests that only error
(a crash) do not count. Exit status 1 if any mutation survives or a control misbehaves.

    .venv/bin/python scripts/mutations.py                # all mutations, prints the table
    .venv/bin/python scripts/mutations.py --write-doc    # also writes docs/security-mutations.md
    .venv/bin/python scripts/mutations.py --only no_rerandomisation --only drelu_opens_bit
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ("tests/security",)
DOC = ROOT / "docs" / "security-mutations.md"
IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc",
                                "*.egg-info", "models")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str


SANITY = Mutation(
    "sanity_control", "control: the test hook records 0 for every opened value (protocol unchanged)",
    "cryptogen/mpc/arith.py",
    "        p.chan.opened.append(out.copy())\n",
    "        p.chan.opened.append(out.copy() * 0)  # MUTATION (control)\n")

MUTATIONS = [
    Mutation("no_rerandomisation", "export does not add Enc_pk(0) (c1 not re-randomised)",
             "cryptogen/he/engine.py",
             "            data += self._enc_zero(k)\n",
             "            pass  # MUTATION: no re-randomisation\n"),
    Mutation("no_flooding", "export does not flood the noise",
             "cryptogen/he/engine.py",
             "            _flood_into(data[0], self.flood_bits(budget), self._qi[:k])\n",
             "            pass  # MUTATION: no flooding\n"),
    Mutation("flood_sigma_0", "flooding at sigma = 0 bits (flood_bits drops flood_sigma)",
             "cryptogen/he/engine.py",
             "self.config.flood_sigma + math.log2(self.config.n)",
             "0 + math.log2(self.config.n)"),
    Mutation("trunc_opens_input", "truncation also opens its input x' (before masking with r)",
             "cryptogen/mpc/compare.py",
             "    c = open_(p, add(xp, r, p.t))\n",
             "    open_(p, xp)  # MUTATION\n    c = open_(p, add(xp, r, p.t))\n"),
    Mutation("drelu_opens_bit", "DReLU opens its result bit",
             "cryptogen/mpc/compare.py",
             "    return add_sp(p, neg(lsb, p.t), 1)\n",
             "    out = add_sp(p, neg(lsb, p.t), 1)\n    open_(p, out)  # MUTATION\n    return out\n"),
    Mutation("open_2x", "DReLU opens y = 2x (its doubled input)",
             "cryptogen/mpc/compare.py",
             "    y = add(x, x, p.t)\n",
             "    y = add(x, x, p.t)\n    open_(p, y)  # MUTATION\n"),
    Mutation("softmax_opens_input", "softmax opens its input scores",
             "cryptogen/mpc/softmax.py",
             "    p.check(x)\n    if x.ndim < 1 or x.shape[-1] < 1:\n",
             "    p.check(x)\n    from .arith import open_\n    open_(p, x)  # MUTATION\n"
             "    if x.ndim < 1 or x.shape[-1] < 1:\n"),
    Mutation("layernorm_opens_output", "LayerNorm opens its output",
             "cryptogen/mpc/layernorm.py",
             "    return _affine(p, n, gamma, beta, d, f)\n",
             "    out = _affine(p, n, gamma, beta, d, f)\n    from .arith import open_\n"
             "    open_(p, out)  # MUTATION\n    return out\n"),
    Mutation("pool_reuses_items", "the randomness pool hands out the same triples / solved bits twice "
             "(a partial take does not advance it)",
             "cryptogen/mpc/provider.py",
             "                self.chunks[0] = tuple(a[k:] for a in ch)\n",
             "                pass  # MUTATION: items are handed out again\n"),
    Mutation("dealer_one_bits_mask", "the dealer uses one solved-bits mask r for a whole batch",
             "cryptogen/mpc/provider.py",
             "        r = random_elements(n, self.t)\n        bits = ",
             "        r = np.repeat(random_elements(1, self.t), n)  # MUTATION\n        bits = "),
    Mutation("triple_a_equals_b", "Beaver triples with a = b (one mask for both operands)",
             "cryptogen/mpc/provider.py",
             "        a, b = random_elements(n, self.t), random_elements(n, self.t)\n",
             "        a = random_elements(n, self.t)\n        b = a  # MUTATION\n"),
    Mutation("argmax_opens_winner", "token-only argmax opens each round's winning value",
             "cryptogen/mpc/argmax.py",
             "        m, i = add(b, both[..., :h], p.t), add(ib, both[..., h:], p.t)\n",
             "        m, i = add(b, both[..., :h], p.t), add(ib, both[..., h:], p.t)\n"
             "        from .arith import open_; open_(p, m)  # MUTATION\n"),
]

BOOT = '''\
import sys
copy, orig = sys.argv[1], sys.argv[2]
sys.path.insert(0, copy)
for name, mod in list(sys.modules.items()):
    mapping = getattr(mod, "MAPPING", None)
    if name.startswith("__editable__") and isinstance(mapping, dict):
        for k, v in list(mapping.items()):
            if v == orig or v.startswith(orig + "/"):
                mapping[k] = copy + v[len(orig):]
import cryptogen, cryptogen.he.engine, cryptogen.mpc.compare, cryptogen.scheduler.inprocess
import cryptogen.client.session, cryptogen.workers.shard
for m in [m for n, m in sys.modules.items() if n == "cryptogen" or n.startswith("cryptogen.")]:
    f = getattr(m, "__file__", None) or ""
    if f and not f.startswith(copy + "/"):
        raise SystemExit(f"mutation run imports {m.__name__} from {f}, not from the copy {copy}")
import pytest
sys.exit(pytest.main(sys.argv[3:]))
'''


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def check_snippets(mutations) -> None:
    bad = []
    for m in mutations:
        text = (ROOT / m.path).read_text()
        n = text.count(m.old)
        if n != 1:
            bad.append(f"  {m.name}: snippet occurs {n} times in {m.path}:\n    {m.old!r}")
    if bad:
        raise SystemExit("mutation snippets no longer match exactly once (update scripts/mutations.py):\n"
                         + "\n".join(bad))


def run_tests(copy: Path, tests, xml: Path) -> tuple[int, dict, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [python(), str(copy / "_mutation_boot.py"), str(copy), str(ROOT), "-q", "-p", "no:cacheprovider",
           "-o", "addopts=", "--junitxml", str(xml), *tests]
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    outcome = defaultdict(list)  # failed / error -> [test ids]
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            test = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            if case.find("failure") is not None:
                outcome["failed"].append(test)
            elif case.find("error") is not None:
                outcome["error"].append(test)
        xml.unlink()
    return proc.returncode, outcome, proc.stdout[-3000:] + proc.stderr[-3000:]


def summarise(tests: list[str]) -> str:
    """test ids grouped by function: file::test[param1,param2]."""
    groups: dict = defaultdict(list)
    for t in tests:
        base, _, param = t.partition("[")
        groups[base].append(param.rstrip("]"))
    return "<br>".join(f"{b}[{','.join(p for p in ps if p)}]" if any(ps) else b for b, ps in groups.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", help="run only these mutations (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--write-doc", action="store_true", help=f"write the table to {DOC.relative_to(ROOT)}")
    ap.add_argument("--no-controls", action="store_true", help="skip the baseline and sanity runs")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutation in {args.only}; known: {[m.name for m in MUTATIONS]}")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24s} {m.path:28s} {m.what}")
        return 0
    check_snippets(chosen + [SANITY])
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="cryptogen-mut-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        (copy / "_mutation_boot.py").write_text(BOOT)
        xml = Path(tmp) / "junit.xml"
        plan = ([None, SANITY] if not args.no_controls else []) + chosen
        for m in plan:
            t0 = time.time()
            target = copy / m.path if m else None
            original = target.read_text() if m else None
            if m:
                if original.count(m.old) != 1:
                    raise SystemExit(f"{m.name}: snippet does not occur exactly once in the copy of {m.path}")
                target.write_text(original.replace(m.old, m.new, 1))
            try:
                rc, outcome, tail = run_tests(copy, TESTS, xml)
            finally:
                if m:
                    target.write_text(original)
            secs = time.time() - t0
            if m is None:  # baseline: the unmutated copy must pass
                if rc != 0 or outcome["failed"] or outcome["error"]:
                    print(tail)
                    raise SystemExit("baseline: the security tests fail on the UNMUTATED copy; fix that first")
                print(f"baseline (unmutated copy): all passed in {secs:.0f} s")
                continue
            caught = bool(outcome["failed"])
            result = f"caught ({len(outcome['failed'])} failing, {secs:.0f} s)" if caught else (
                f"SURVIVED ({len(outcome['error'])} errors only)" if outcome["error"] else "SURVIVED")
            if m is SANITY:
                if not caught:
                    print(tail)
                    raise SystemExit("sanity control not caught: the copy is probably not what gets imported")
                print(f"sanity control: caught as expected ({secs:.0f} s)")
                continue
            ok &= caught
            if not caught:
                print(tail)
            rows.append((m, summarise(outcome["failed"]) or "-", result))
            print(f"{m.name}: {result}", flush=True)
    table = ["| mutation | file | caught by (test ids) | result |", "|---|---|---|---|"]
    table += [f"| `{m.name}`: {m.what} | `{m.path}` | {by} | {res} |" for m, by, res in rows]
    print("\n" + "\n".join(table))
    if args.write_doc:
        DOC.write_text(DOC_HEAD + "\n".join(table) + "\n\n" + f"Generated by `scripts/mutations.py --write-doc` on "
                       f"{time.strftime('%Y-%m-%d')}; {'every mutation was caught' if ok else 'SOME MUTATIONS SURVIVED'}.\n")
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0 if ok else 1


DOC_HEAD = """# Security mutation testing

`scripts/mutations.py` breaks privacy on purpose -- one exact text replacement per mutation, applied
to a temporary copy of the repository -- and runs the security tests (`tests/security/`) there.
Every mutation must make at least one test fail (an assertion, not a crash). Controls: the
unmutated copy passes, and a control mutation that only falsifies the test hook's record of the
opened values is caught (so the copy's code is what the tests import).

The tests (false-alarm probabilities are stated in each module's docstring; < 1e-6 overall):

* `test_openings.py` -- per protocol (Beaver mul + truncation, matmul + truncation, DReLU, causal
  softmax, LayerNorm with server-private gamma/beta, GELU, the token-only argmax), 16 runs on each
  of two fixed inputs:
  every opened position varies between runs (not on an arc of t/64), every call site is uniform
  (chi-square), the two inputs give the same distribution per call site (two-sample chi-square),
  and no mask is used twice (near-equal differences between two runs at two positions).
* `test_circuit_privacy.py` -- exports of `Enc(x_c) x W - r` and of `Enc(x_c) - r` seen with the
  client's secret key: c1 fresh (not the client's or the server's c1, not shared by two exports,
  uniform mod every q_i), noise flooded to >= 2^(sigma + (X + log2 n)/2 - 2) times the evaluation
  noise bound (2^X exports per key) and freshly drawn on every export.
* `test_e2e_transcripts.py` -- both parties' complete transcripts (every message each receives,
  per link) of a secure generation (tiny one-layer GPT-2, two workers, prefill + one decode step),
  twice on one prompt and once on another: every message classified, each opening differs between
  the two runs of one prompt at each call site, the two prompts give the same distribution per
  call site (two-sample chi-square), the client gets only flooded, re-randomised ciphertexts.

"""

if __name__ == "__main__":
    sys.exit(main())
