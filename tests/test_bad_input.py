"""Bad input everywhere (issue #13): every flag of every command, and the Python APIs' arguments.

A bad value gives exactly one line on stderr (``error: <what was wrong>; <what to do>``), exit
code 2 and no traceback, and it is found right after parsing: before a model is loaded for work,
Ray is started, a local server is spawned or HE keys are made. Those steps are replaced here by
functions that fail the test if they are reached. The APIs raise ValueError before any costly work.
"""
from __future__ import annotations

import inspect
import math
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptogen.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
N_POS = 16  # the tiny model's context


class WorkStarted(AssertionError):
    """Raised by the stand-ins of Ray, the local server, key generation, training, ..."""


def _refuse(what):
    def fail(*args, **kwargs):
        raise WorkStarted(f"{what} was reached: the input should have been refused before")
    return fail


@pytest.fixture
def no_work(monkeypatch):
    """Everything costly fails the test if it is reached."""
    import ray

    import cryptogen.bench
    import cryptogen.client.local_server
    import cryptogen.client.proxy
    import cryptogen.client.remote
    import cryptogen.cluster.connect
    import cryptogen.data
    import cryptogen.dealer.service
    import cryptogen.evaluate
    import cryptogen.he.keys
    import cryptogen.train

    monkeypatch.setattr(ray, "init", _refuse("ray.init"))
    monkeypatch.setattr(cryptogen.cluster.connect, "connect", _refuse("Ray (cluster.connect)"))
    monkeypatch.setattr(cryptogen.he.keys.ClientKeys, "generate", classmethod(_refuse("HE key generation")))
    monkeypatch.setattr(cryptogen.client.local_server.LocalServer, "start", _refuse("a local server"))
    monkeypatch.setattr(cryptogen.client.remote, "connect", _refuse("a server connection"))
    monkeypatch.setattr(cryptogen.train, "train", _refuse("training"))
    monkeypatch.setattr(cryptogen.train, "_encoded_ids", _refuse("tokenizer training"))
    monkeypatch.setattr(cryptogen.dealer.service.DealerServer, "start", _refuse("the dealer"))
    monkeypatch.setattr(cryptogen.client.proxy, "Upstream", _refuse("the proxy"))
    monkeypatch.setattr(cryptogen.bench, "load_model", _refuse("the bench"))
    monkeypatch.setattr(cryptogen.evaluate, "perplexity", _refuse("perplexity"))
    monkeypatch.setattr(cryptogen.evaluate, "lambada_accuracy", _refuse("LAMBADA"))
    monkeypatch.setattr(cryptogen.data, "load_text", _refuse("reading a data set"))
    monkeypatch.setattr(GPT, "generate", _refuse("generation"))
    yield
    assert not ray.is_initialized()


def byte_tokenizer():
    """Byte-level BPE without merges: one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):  # GPT-2's byte-to-character map
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tok = Tokenizer(models.BPE(vocab={chr(c): b for b, c in zip(bs, cs)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """{tiny}: a checkpoint folder (context 16, 2 heads); {missing}: no such file; {dir}: a folder;
    {file}: a regular file; {empty}: a folder without a model."""
    d = tmp_path_factory.mktemp("bad-input")
    tiny = d / "tiny"
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=256, n_positions=N_POS, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tiny)
    byte_tokenizer().save(str(tiny / "tokenizer.json"))
    (d / "empty").mkdir()
    (d / "file.txt").write_text("not a folder\n")
    return {"tiny": str(tiny), "missing": str(d / "no-such-file.json"), "dir": str(d), "file": str(d / "file.txt"),
            "empty": str(d / "empty")}


@pytest.fixture(scope="module")
def taken_port():
    """A port something listens on."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


LONG = "word " * 20  # 100 byte tokens: more than the tiny context
SERVE = ["serve", "--model", "{tiny}", "--listen", "127.0.0.1:0", "--connection-file", "{dir}/server.json",
         "--state-dir", "{dir}/state"]
BENCH = ["bench", "--model", "{tiny}", "--out", "{dir}/bench/out.json"]
PROXY = ["proxy", "--connect", "{missing}"]
DEALER = ["dealer", "--state-dir", "{dir}/dealer-state", "--out", "{dir}/dealer-out"]

# (argv, a fragment of the one-line error)
CASES = [
    # ---- generate
    (["generate", "--prompt", "hi", "--provider", "nope"], "unknown --provider 'nope'; choose he or dealer"),
    (["generate", "--prompt", "hi", "--metrics-port", "99999"], "--metrics-port 99999 is out of range"),
    (["generate", "--prompt", "hi", "--metrics-port", "-1"], "--metrics-port -1 is out of range"),
    (["generate", "--prompt", "hi", "--metrics-port", "http"], "invalid value for '--metrics-port'"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature nan is not a finite number"),
    (["generate", "--prompt", "hi", "--temperature", "inf"], "--temperature inf is not a finite number"),
    (["generate", "--prompt", "hi", "--temperature", "-inf"], "--temperature -inf is not a finite number"),
    (["generate", "--prompt", "hi", "--temperature", "1e400"], "--temperature inf is not a finite number"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "--temperature -0.5 is out of range"),
    (["generate", "--prompt", "hi", "--temperature", "warm"], "invalid value for '--temperature'"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k -1 is out of range"),
    (["generate", "--prompt", "hi", "--top-k", "1.5"], "invalid value for '--top-k'"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0 is out of range; use an integer >= 1"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens -3 is out of range"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "many"], "invalid value for '--max-new-tokens'"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed -1 is out of range"),
    (["generate", "--prompt", "hi", "--mode", "fast"], "unknown --mode 'fast'; choose kv-reuse or recompute"),
    (["generate", "--prompt", "hi", "--reveal", "all"], "unknown --reveal 'all'; choose token or logits"),
    (["generate", "--prompt", "hi", "--workers", "0"], "--workers 0 is out of range"),
    (["generate", "--prompt", "hi", "--secure", "--workers", "-2"], "--workers -2 is out of range"),
    (["generate", "--prompt", "hi", "--address", "nope"], "--address 'nope' is not a Ray cluster address"),
    (["generate", "--prompt", "hi", "--secure", "--address", "127.0.0.1:0"], "is not a Ray cluster address"),
    (["generate", "--prompt", "hi", "--connect", "{missing}"], "no-such-file.json: no such file"),
    (["generate", "--prompt", "hi", "--connect", "{dir}"], "is not a file"),
    (["generate", "--prompt", "hi", "--server", "nohost"], "--server 'nohost' is not HOST:PORT"),
    (["generate", "--prompt", "hi", "--server", "example.org:70000"], "is not HOST:PORT"),
    (["generate", "--prompt", "hi", "--server", "example.org:7860", "--server-cert", "{missing}"], "no such file"),
    (["generate", "--prompt", "hi", "--provider", "dealer", "--dealer", "{missing}"], "no-such-file.json: no such file"),
    (["generate", "--prompt", "hi", "--secure", "--provider", "dealer"], "--provider dealer needs --dealer FILE"),
    (["generate", "--prompt", "hi", "--secure", "--temperature", "1", "--top-k", "5"], "--top-k needs the logits"),
    (["generate", "--prompt", "   "], "the prompt is empty"),
    (["generate", "--prompt", "hi", "--bogus"], "no such option: --bogus"),
    (["generate"], "missing option '--prompt'"),
    (["generate", "--prompt"], "--prompt"),
    (["generate", "--prompt", "hi", "--model", "nope"], "unknown model 'nope'"),
    (["generate", "--prompt", "hi", "--secure", "--model", "nope"], "unknown model 'nope'"),
    (["generate", "--prompt", "hi", "--secure", "--model", "{empty}"], "has no config.json"),
    (["generate", "--prompt", LONG, "--model", "{tiny}"], f"more than the model's context of {N_POS}"),
    (["generate", "--prompt", LONG, "--secure", "--model", "{tiny}"], f"more than the model's context of {N_POS}"),
    (["generate", "--prompt", "hi", "--secure", "--model", "{tiny}", "--max-new-tokens", "16"],
     f"more than the model's context of {N_POS}"),
    (["generate", "--prompt", "hi", "--secure", "--model", "{tiny}", "--max-new-tokens", "2", "--metrics-port",
      "{taken}"], "the port is in use"),
    # ---- eval
    (["eval", "--window", "1"], "--window 1 is out of range; use an integer >= 2"),
    (["eval", "--windows", "0"], "--windows 0 is out of range"),
    (["eval", "--secure", "--workers", "0"], "--workers 0 is out of range"),
    (["eval", "--max-tokens", "1"], "--max-tokens 1 is out of range"),
    (["eval", "--lambada", "--lambada-limit", "0"], "--lambada-limit 0 is out of range"),
    (["eval", "--provider", "nope"], "unknown --provider 'nope'"),
    (["eval", "--secure", "--provider", "nope"], "unknown --provider 'nope'"),
    (["eval", "--secure", "--provider", "dealer"], "--provider dealer needs --dealer FILE"),
    (["eval", "--secure", "--connect", "{missing}"], "no such file"),
    (["eval", "--secure", "--address", "h:p"], "is not a Ray cluster address"),
    (["eval", "--secure", "--model", "{tiny}", "--window", "17"], f"--window 17 exceeds the model's context of {N_POS}"),
    (["eval", "--data", "nope"], "unknown data set 'nope'"),
    (["eval", "--split", "nope"], "has no split 'nope'"),
    (["eval", "--data-dir", "{empty}"], "missing data file"),
    (["eval", "--model", "nope"], "unknown model 'nope'"),
    # ---- serve
    (["serve", "--listen", "nope"], "--listen 'nope' is not HOST:PORT"),
    (["serve", "--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
    (["serve", "--listen", "127.0.0.1:-1"], "is not HOST:PORT"),
    (SERVE + ["--listen", "127.0.0.1:{taken}"], "the port is in use"),
    (SERVE + ["--listen", "192.0.2.1:7860"], "cannot listen there"),
    (["serve", "--metrics-port", "99999"], "--metrics-port 99999 is out of range"),
    (SERVE + ["--metrics-port", "{taken}"], "--metrics-port 127.0.0.1:"),
    (["serve", "--idle-timeout", "nan"], "--idle-timeout nan is not a finite number"),
    (["serve", "--idle-timeout", "inf"], "--idle-timeout inf is not a finite number"),
    (["serve", "--idle-timeout", "0"], "--idle-timeout 0 is out of range"),
    (["serve", "--resume-grace", "-1"], "--resume-grace -1 is out of range"),
    (["serve", "--resume-grace", "nan"], "--resume-grace nan is not a finite number"),
    (["serve", "--kv-budget-mb", "0"], "--kv-budget-mb 0 is out of range"),
    (["serve", "--workers", "0"], "--workers 0 is out of range"),
    (["serve", "--max-sessions", "0"], "--max-sessions 0 is out of range"),
    (["serve", "--layer-groups", "0"], "--layer-groups 0 is out of range"),
    (["serve", "--num-cpus", "0"], "--num-cpus 0 is out of range"),
    (["serve", "--address", "nope"], "--address 'nope' is not a Ray cluster address"),
    (["serve", "--model", "nope"], "unknown model 'nope'"),
    (SERVE + ["--model", "{empty}"], "has no config.json"),
    (SERVE + ["--workers", "3"], "3 workers share a layer but it has only 2 heads"),
    (SERVE + ["--connection-file", "{dir}/no/such/server.json"], "does not exist"),
    (SERVE + ["--connection-file", "{dir}"], "is a folder"),
    (SERVE + ["--cert", "{file}"], "give both --cert and --key"),
    (SERVE + ["--cert", "{missing}", "--key", "{missing}"], "--cert"),
    (SERVE + ["--state-dir", "{file}/state"], "is not a folder"),
    (SERVE + ["--dealer", "{missing}"], "--dealer"),
    # ---- proxy
    (PROXY + ["--max-sessions", "0"], "--max-sessions 0 is out of range"),
    (PROXY + ["--provider", "nope"], "unknown --provider 'nope'"),
    (PROXY + ["--mode", "nope"], "unknown --mode 'nope'"),
    (PROXY + ["--listen", "127.0.0.1:99999"], "is not HOST:PORT"),
    (PROXY + ["--listen", "nope"], "--listen 'nope' is not HOST:PORT"),
    (PROXY + ["--listen", "0.0.0.0:8000"], "not a loopback address"),
    (PROXY + ["--listen", "0.0.0.0:8000", "--allow-remote"], "needs a local API key"),
    (PROXY + ["--local-api-key", " "], "--local-api-key is empty"),
    (PROXY + ["--provider", "dealer"], "--provider dealer needs --dealer FILE"),
    (PROXY + ["--provider", "dealer", "--dealer", "{missing}"], "--dealer"),
    (PROXY, "cannot read the connection file"),
    (["proxy"], "missing option '--connect'"),
    # ---- dealer
    (DEALER + ["--listen", "nope"], "--listen 'nope' is not HOST:PORT"),
    (DEALER + ["--listen", "1.2.3.4:99999"], "is not HOST:PORT"),
    (DEALER + ["--out", "{file}/out"], "--out {file}/out: {file} is not a folder"),
    (DEALER + ["--state-dir", "{file}/state"], "--state-dir {file}/state: {file} is not a folder"),
    (DEALER + ["--step-ahead-mib", "-1"], "--step-ahead-mib must be 0 or more, got -1"),
    # ---- train
    (["train", "--lr", "nan"], "--lr nan is not a finite number"),
    (["train", "--lr", "0"], "--lr 0 is out of range; use a number > 0"),
    (["train", "--lr", "-1"], "--lr -1 is out of range"),
    (["train", "--steps", "0"], "--steps 0 is out of range"),
    (["train", "--batch", "0"], "--batch 0 is out of range"),
    (["train", "--block", "1"], "--block 1 is out of range"),
    (["train", "--block", "513"], "--block 513 is out of range"),
    (["train", "--vocab-size", "100"], "--vocab-size 100 is out of range"),
    (["train", "--vocab-size", "70000"], "--vocab-size 70000 is out of range"),
    (["train", "--n-embd", "30", "--n-head", "4"], "--n-embd 30 is not a multiple of --n-head 4"),
    (["train", "--n-head", "0"], "--n-head 0 is out of range"),
    (["train", "--n-layer", "0"], "--n-layer 0 is out of range"),
    (["train", "--ckpt-every", "0"], "--ckpt-every 0 is out of range"),
    (["train", "--seed", "-1"], "--seed -1 is out of range"),
    (["train", "--data", "nope"], "unknown --data 'nope'"),
    (["train", "--out", "{file}/model"], "is not a folder"),
    (["train", "--out", "{dir}/m", "--run-dir", "{file}/run"], "is not a folder"),
    (["train", "--data-dir", "{empty}", "--out", "{dir}/m", "--run-dir", "{dir}/r"], "missing data file"),
    # ---- bench
    (BENCH + ["--tokens", "0"], "--tokens 0 is out of range"),
    (BENCH + ["--max-minutes", "nan"], "--max-minutes nan is not a finite number"),
    (BENCH + ["--max-minutes", "0"], "--max-minutes 0 is out of range"),
    (BENCH + ["--workers", "0"], "--workers must be positive integers"),
    (BENCH + ["--workers", "one"], "--workers must be comma-separated integers"),
    (BENCH + ["--contexts", "0"], "--contexts must be positive integers"),
    (BENCH + ["--contexts", "a,b"], "--contexts must be comma-separated integers"),
    (BENCH + ["--sweep-backend", "gpu"], "unknown --sweep-backend 'gpu'"),
    (BENCH + ["--sweep-context", "0"], "--sweep-context 0 is out of range"),
    (BENCH + ["--contexts", "4", "--sweep-context", "100"], f"exceed the model's context of {N_POS}"),
    (BENCH + ["--recompute-max-context", "-1"], "--recompute-max-context -1 is out of range"),
    (BENCH + ["--address", "nope"], "is not a Ray cluster address"),
    (BENCH + ["--out", "{dir}"], "is a folder"),
    (BENCH + ["--out", "{file}/x.json"], "is not a folder"),
    (BENCH + ["--gpt2-base-layers", "0"], "--gpt2-base-layers 0 is out of range"),
    (BENCH + ["--seed", "-1"], "--seed -1 is out of range"),
    (["bench", "--model", "nope", "--out", "{dir}/b.json"], "unknown model 'nope'"),
    # ---- init
    (["init", "--out", "{dir}/g", "--shape", "gpt5"], "unknown --shape 'gpt5'"),
    (["init", "--out", "{dir}/g", "--layers", "0"], "--layers 0 is out of range"),
    (["init", "--out", "{dir}/g", "--dtype", "int8"], "unknown --dtype 'int8'"),
    (["init", "--out", "{dir}/g", "--seed", "-1"], "--seed -1 is out of range"),
    (["init", "--out", "{file}/g"], "is not a folder"),
    (["init", "--out", "{tiny}"], "exists and is not an empty folder"),
    (["init"], "missing option '--out'"),
    # ---- the group
    (["nosuchcommand"], "no such command 'nosuchcommand'"),
    (["--debugg", "generate"], "no such option: --debugg"),
]


def _fill(argv, paths, taken_port):
    return [a.format(**paths, taken=taken_port) for a in argv]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from cryptogen.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, fragment):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], err


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_flag_is_one_line_before_any_work(argv, fragment, paths, taken_port, no_work, capsys):
    code, _, err = run_cli(_fill(argv, paths, taken_port), capsys)
    assert_one_line_error(code, err, fragment.format(**paths))


def test_bench_makes_no_output_folder(paths, taken_port, no_work, capsys):
    out = Path(paths["dir"]) / "never" / "bench.json"
    code, _, err = run_cli(_fill(BENCH, paths, taken_port) + ["--tokens", "0", "--out", str(out)], capsys)
    assert code == 2 and not out.parent.exists()


def test_help_still_works(capsys):
    from cryptogen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=st.floats(allow_nan=True, allow_infinity=True))
def test_any_temperature_flag_is_accepted_or_one_line(t, paths, taken_port, no_work, capsys):
    # a valid temperature gets as far as the model (an unknown one here): still one line, no work
    code, _, err = run_cli(["generate", "--prompt", "hi", "--model", "nope", "--temperature", repr(t)], capsys)
    valid = math.isfinite(t) and t >= 0
    assert_one_line_error(code, err, "unknown model 'nope'" if valid else "--temperature")


# ---- end to end: no traceback from the real entry point --------------------------------------------
def test_entry_point_prints_one_line_without_traceback(tmp_path):
    runs = [["generate", "--prompt", "hi", "--provider", "nope"],
            ["serve", "--metrics-port", "99999"],
            ["generate", "--prompt", "hi", "--secure", "--max-new-tokens", "0"]]
    procs = [subprocess.Popen([sys.executable, "-m", "cryptogen.cli", *a], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in runs]
    for p, frag in zip(procs, ["unknown --provider 'nope'", "--metrics-port 99999 is out of range",
                               "--max-new-tokens 0 is out of range"]):
        out, err = p.communicate(timeout=120)
        assert_one_line_error(p.returncode, err, frag)
        assert out == ""
    assert list(tmp_path.iterdir()) == []  # no connection file, no state, no Ray session folder


# ---- the Python APIs: ValueError before any costly work --------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": NAN}, "temperature nan"), ({"temperature": INF}, "temperature inf"),
    ({"temperature": -1.0}, "temperature -1.0"), ({"temperature": "1"}, "temperature '1'"),
    ({"temperature": True}, "temperature True"), ({"top_k": -1}, "top-k -1"), ({"top_k": 1.5}, "top-k 1.5"),
    ({"top_k": True}, "top-k True"), ({"top_p": 0.0}, "top-p 0.0"), ({"top_p": 1.5}, "top-p 1.5"),
    ({"top_p": NAN}, "top-p nan"), ({"top_p": INF}, "top-p inf"), ({"seed": -1}, "seed -1"),
    ({"seed": 1.5}, "seed 1.5"), ({"logit_bias": {1: NAN}}, "biases must be in [-100, 100]"),
    ({"logit_bias": {1: 200}}, "biases must be in [-100, 100]"), ({"logit_bias": {1: "x"}}, "biases"),
    ({"logit_bias": {-1: 0}}, "token ids must be non-negative integers"),
    ({"logit_bias": {NAN: 0}}, "token ids must be non-negative integers"),
    ({"logit_bias": {"a": 0}}, "token ids must be non-negative integers"),
    ({"logit_bias": [1, 2]}, "logit_bias must map token ids"), ({"logit_bias": 5}, "logit_bias must map token ids"),
])
def test_sampling_config_refuses(kwargs, fragment):
    from cryptogen.sampling import SamplingConfig

    with pytest.raises(ValueError) as e:
        SamplingConfig(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=200, deadline=None)
@given(t=st.floats(allow_nan=True, allow_infinity=True), p=st.floats(allow_nan=True, allow_infinity=True),
       k=st.integers(-10, 10), seed=st.one_of(st.none(), st.integers(-5, 2 ** 70)))
def test_sampling_config_accepts_exactly_the_valid_values(t, p, k, seed):
    from cryptogen.sampling import SamplingConfig

    valid = math.isfinite(t) and t >= 0 and 0 < p <= 1 and k >= 0 and (seed is None or seed >= 0)
    try:
        cfg = SamplingConfig(t, k, seed, top_p=p)
    except ValueError:
        assert not valid
    else:
        assert valid and cfg.temperature == t and cfg.top_p == p


@pytest.mark.parametrize("change, fragment", [
    ({"max_new_tokens": 0}, "--max-new-tokens 0 is out of range"),
    ({"max_new_tokens": -1}, "--max-new-tokens -1 is out of range"),
    ({"max_new_tokens": 1.5}, "--max-new-tokens 1.5 is not an integer"),
    ({"max_new_tokens": True}, "--max-new-tokens True is not an integer"),
    ({"sampling": (NAN, 0, None)}, "--temperature nan"), ({"sampling": (0.5, -1, None)}, "--top-k -1"),
    ({"sampling": (0.0, 0, -7)}, "--seed -7"), ({"workers": 0}, "--workers 0"), ({"mode": "x"}, "unknown --mode"),
    ({"provider": "x"}, "unknown --provider"), ({"metrics_port": 65536}, "--metrics-port 65536"),
    ({"reveal": "x"}, "unknown --reveal"), ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": None}, "the prompt must be text"), ({"prompt": LONG}, "more than the model's context"),
    ({"address": "x"}, "is not a Ray cluster address"),
])
def test_generate_secure_api_refuses_before_any_work(change, fragment, paths, no_work):
    from cryptogen.secure_cli import generate_secure

    args = dict(prompt="hi", model=paths["tiny"], max_new_tokens=2, sampling=(0.0, 0, None), workers=1,
                mode="kv-reuse", address=None, provider="he", metrics_port=None)
    args.update(change)
    with pytest.raises(ValueError) as e:
        generate_secure(**args)
    assert fragment in str(e.value)


def test_what_the_server_offers_is_checked_before_a_session():
    from cryptogen.secure_cli import _check_server_offers

    token_only = types.SimpleNamespace(server_opens_logits=False, server_has_dealer=True)
    no_dealer = types.SimpleNamespace(server_opens_logits=True, server_has_dealer=False)
    with pytest.raises(ValueError, match="opens no logits"):
        _check_server_offers(token_only, "he", logits=True)
    with pytest.raises(ValueError, match="has no dealer"):
        _check_server_offers(no_dealer, "dealer", logits=False)
    _check_server_offers(token_only, "dealer", logits=False)


@pytest.mark.parametrize("change, fragment", [
    ({"windows": 0}, "--windows 0"), ({"window": 1}, "--window 1"), ({"window": N_POS + 1}, "exceeds the model's"),
    ({"workers": 0}, "--workers 0"), ({"provider": "x"}, "unknown --provider"),
])
def test_secure_eval_api_refuses_before_any_work(change, fragment, paths, no_work, monkeypatch):
    import cryptogen.data
    from cryptogen.secure_cli import secure_eval

    monkeypatch.setattr(cryptogen.data, "data_path", lambda *a: None)  # no data set needed for these checks
    args = dict(model_name=paths["tiny"], data=None, split="test", data_dir=None, windows=2, window=8, workers=1,
                address=None, provider="he")
    args.update(change)
    with pytest.raises(ValueError) as e:
        secure_eval(**args)
    assert fragment in str(e.value)


def test_evaluate_api_refuses_before_reading_data(monkeypatch):
    import numpy as np

    from cryptogen import evaluate

    monkeypatch.setattr(evaluate, "load_text", _refuse("reading a data set"))
    monkeypatch.setattr(evaluate, "lambada_examples", _refuse("reading LAMBADA"))
    ids = np.arange(10)
    for window, max_tokens, fragment in ((1, None, "window 1"), (0, None, "window 0"), (2.5, None, "window 2.5"),
                                         (4, 0, "max_tokens 0"), (4, -1, "max_tokens -1")):
        with pytest.raises(ValueError, match=fragment):
            evaluate.eval_windows(ids, window, max_tokens)
    with pytest.raises(ValueError, match="max_tokens 0"):
        evaluate.perplexity(None, None, "wikitext2", max_tokens=0)
    with pytest.raises(ValueError, match="limit 0"):
        evaluate.lambada_accuracy(None, None, limit=0)
    model = types.SimpleNamespace(config=types.SimpleNamespace(n_positions=4))
    with pytest.raises(ValueError, match="cannot be scored"):
        evaluate.window_nll(model, np.arange(6))


@pytest.mark.parametrize("change, fragment", [
    ({"idle_timeout": NAN}, "--idle-timeout nan"), ({"idle_timeout": -INF}, "--idle-timeout -inf"),
    ({"metrics_port": 70000}, "--metrics-port 70000"), ({"metrics_port": 1.5}, "--metrics-port 1.5"),
    ({"workers": 0}, "--workers 0"), ({"workers": "2"}, "--workers '2'"), ({"num_cpus": 0}, "--num-cpus 0"),
    ({"listen": "127.0.0.1"}, "is not HOST:PORT"), ({"token_only": "yes"}, "token_only 'yes'"),
])
def test_serve_options_refused_before_ray(change, fragment, paths, no_work):
    from cryptogen.server.serve import ServeError, ServeOptions, start

    opts = dict(model=paths["tiny"], listen="127.0.0.1:0", connection_file=f"{paths['dir']}/s.json",
                state_dir=f"{paths['dir']}/state")
    opts.update(change)
    with pytest.raises(ServeError) as e:
        start(ServeOptions(**opts))
    assert isinstance(e.value, ValueError) and fragment in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    ({"max_sessions": 0}, "--max-sessions 0"), ({"max_sessions": 2.0}, "--max-sessions 2.0"),
    ({"listen": "localhost:65536"}, "is not HOST:PORT"), ({"ban_unk": "no"}, "ban_unk 'no'"),
])
def test_proxy_options_refused(change, fragment, paths):
    from cryptogen.client.proxy import ProxyConfigError, ProxyOptions

    with pytest.raises(ProxyConfigError, match=fragment):
        ProxyOptions(connect=paths["missing"], **change).address()


def test_bench_options_refused_before_work(paths, no_work):
    from cryptogen.bench import BenchError, BenchOptions, run

    for change, fragment in (({"max_minutes": NAN}, "--max-minutes nan"), ({"tokens": 0}, "--tokens 0"),
                             ({"workers": 2}, "--workers 2 is not allowed"), ({"seed": -1}, "--seed -1")):
        with pytest.raises(BenchError, match=fragment):
            run(BenchOptions(model=paths["tiny"], out=f"{paths['dir']}/b.json", **change))


@settings(max_examples=100, deadline=None)
@given(v=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 70, 2 ** 70), st.booleans(),
                   st.text(max_size=3), st.none()))
def test_openai_request_numbers_are_accepted_or_a_400(v):
    from cryptogen.client.openai_api import APIError, ModelInfo, parse_completion

    info = ModelInfo("m", None, N_POS, 256)
    for key, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1), ("max_tokens", 1, N_POS)):
        try:
            req = parse_completion({"prompt": [1, 2], key: v}, info)
        except APIError as e:
            assert e.status == 400 and len(e.message) < 300
        else:
            ok = v is None or (not isinstance(v, (bool, str)) and math.isfinite(v) and lo <= v <= hi
                               and (key != "top_p" or v > 0) and (key != "max_tokens" or isinstance(v, int)))
            assert ok, (key, v, req)


# ---- client/remote.py (not this change's file): checked before a session at the latest ----------------
def _conn_stub():
    from cryptogen.client.remote import Connection

    cfg = types.SimpleNamespace(n_positions=N_POS, vocab_size=256)
    stub = types.SimpleNamespace(cfg=cfg, server_opens_logits=True, broken=None, dealer_file=None,
                                 encode=lambda s: list(s.encode()), _session=_refuse("a secure session"),
                                 _generate=_refuse("a secure session"))
    stub._ids = lambda ids: Connection._ids(stub, ids)
    return stub


def _call(fn, *args, **kwargs):
    out = fn(*args, **kwargs)
    if inspect.isgenerator(out):  # a generator would check nothing until its first step
        next(out)


@pytest.mark.parametrize("args, kwargs, fragment", [
    (([1, 2], 0), {}, "max_new_tokens"), (([1, 2], -1), {}, "max_new_tokens"), (([], 2), {}, "no tokens"),
    (([1] * N_POS, 2), {}, "exceed the model's context"), (([1, 2], 2), {"reveal": "x"}, "unknown reveal"),
    (([1, 2], 1.5), {}, "max_new_tokens"), (([1, 2], True), {}, "max_new_tokens"),
    (([1, 999], 2), {}, "vocabulary"), (([1, 2.5], 2), {}, "vocabulary"),
])
def test_connection_generate_refuses_before_a_session(args, kwargs, fragment):
    from cryptogen.client.remote import Connection

    with pytest.raises(ValueError, match=fragment):
        _call(Connection.generate, _conn_stub(), *args, **kwargs)


@pytest.mark.parametrize("ids, fragment", [
    ([], "1..16 tokens"), ([1] * (N_POS + 1), "1..16 tokens"),
    ([1, -1], "vocabulary"),
])
def test_connection_score_checks_the_context_first(ids, fragment):
    from cryptogen.client.remote import Connection

    with pytest.raises(ValueError, match=fragment):
        Connection.score(_conn_stub(), ids)


# ---- cryptogen/driver.py (not this change's file): the in-process API -------------------------------
def _driver():
    from cryptogen.driver import Driver
    from cryptogen.plan import make_plan

    cfg = GPTConfig(vocab_size=256, n_positions=N_POS, n_embd=16, n_layer=1, n_head=2)
    runner = types.SimpleNamespace(stage=_refuse("a stage"), barrier=_refuse("a stage"),
                                   reset_cache=_refuse("a stage"))
    return Driver(runner, cfg, make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1))


def test_driver_generate_refuses_no_new_tokens():
    with pytest.raises(ValueError):
        _driver().generate(2, 0)


def test_driver_score_checks_the_context_first():
    with pytest.raises(ValueError):
        _driver().score(N_POS + 1)
