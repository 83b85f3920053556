"""``cryptogen proxy`` with the official ``openai`` package as the client.

A real ``cryptogen serve`` (its own process, embedded Ray) serves a tiny random checkpoint with a
byte-level tokenizer (one token per byte) in a folder named ``wikitext2``, so the shipped models'
``<unk>`` mask is on by default (it bans "<", byte 60). The proxy runs as the CLI command in its
own process where Ray cannot be imported. Secure tokens are compared with plaintext greedy on the
same checkpoint under the same mask (exact equality; the prompts have top-2 logit margins >= 0.06).
"""
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import save_tiny
import torch

from cryptogen.model import GPT, GPTConfig
from cryptogen.sampling import Sampler, SamplingConfig, unk_bans, word_start_ids

ROOT = Path(__file__).resolve().parents[2]
TINY = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)


def byte_tokenizer():
    """Byte-level BPE without merges: token id = byte value (GPT-2's byte-to-character map)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


# ---- no server: the mask, the text assembly, the request checks --------------------------------
def test_mask_bans_and_biases_before_the_choice():
    z = np.array([0.0, 3.0, 2.0, 1.0])
    assert Sampler(SamplingConfig())(z) == 1
    assert Sampler(SamplingConfig().with_bans([1]))(z) == 2
    assert Sampler(SamplingConfig(logit_bias={3: 2.5}))(z) == 3
    cfg = SamplingConfig(temperature=1.0, seed=0, logit_bias={1: -100, 2: -100})
    assert {Sampler(cfg)(z) for _ in range(20)} <= {0, 3}
    assert {Sampler(SamplingConfig(temperature=1.0, top_p=0.5, seed=s))(z) for s in range(20)} == {1}
    with pytest.raises(ValueError, match="every token"):
        Sampler(SamplingConfig().with_bans(range(4)))(z)
    with pytest.raises(ValueError):
        SamplingConfig(logit_bias={1: 200})


def test_unk_mask_is_resolved_from_the_tokenizer_and_on_for_shipped_models(repo_root):
    from cryptogen.tokenizer import load_tokenizer

    tok = load_tokenizer(repo_root / "models" / "wikitext2")
    bans = unk_bans(tok, "wikitext2")
    assert [tok.decode([t]) for t in bans] == ["<", " <"]
    assert unk_bans(tok, "my-model") == [] and unk_bans(tok, "my-model", True) == bans
    assert unk_bans(tok, "wikitext2", False) == []
    assert word_start_ids(byte_tokenizer()) == [60]


def test_text_assembly_holds_back_stop_prefixes_and_partial_characters():
    from cryptogen.client.openai_api import TextAssembler

    tok = byte_tokenizer()
    asm = TextAssembler(tok, stop=("\nUser:",))
    out = [asm.push(b) for b in "Hi\nUs".encode()]
    assert "".join(out) == "Hi"  # "\nUs" may start the stop sequence
    assert asm.push(ord("e")) == "" and asm.push(ord("r")) == "" and asm.push(ord(":")) == ""
    assert asm.finished == "stop" and asm.flush() == ""
    asm = TextAssembler(tok, stop=("\nUser:",))
    assert [asm.push(b) for b in "é\nx".encode()] == ["", "é", "", "\nx"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "max_tokens": 64}, "max_tokens"),
    ({"prompt": "hi", "temperature": 3}, "temperature"),
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "hi", "logit_bias": {"999": -100}}, "logit_bias"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_requests_are_400_with_the_parameter(body, param):
    from cryptogen.client.openai_api import APIError, ModelInfo, parse_completion

    info = ModelInfo("wikitext2", byte_tokenizer(), TINY.n_positions, TINY.vocab_size, (60,))
    with pytest.raises(APIError) as e:
        parse_completion({"model": "wikitext2", **body}, info)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_proxy_refuses_a_public_address_without_the_flag_and_a_key(tmp_path):
    from typer.testing import CliRunner

    from cryptogen.cli import app

    r = CliRunner().invoke(app, ["proxy", "--connect", str(tmp_path / "x.json"), "--listen", "0.0.0.0:8000"])
    assert r.exit_code == 2 and "not a loopback address" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["proxy", "--connect", str(tmp_path / "x.json"), "--listen", "0.0.0.0:8000",
                                 "--allow-remote"])
    assert r.exit_code == 2 and "local API key" in r.output
    r = CliRunner().invoke(app, ["proxy", "--connect", str(tmp_path / "x.json"), "--listen", "127.0.0.1:0"])
    assert r.exit_code == 2 and "cannot read the connection file" in r.output


# ---- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tests/server tiny checkpoint (non-degenerate greedy), named like a shipped model."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "wikitext2")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def greedy(tiny_folder):
    """Plaintext greedy as ``cryptogen generate`` does it (the same Sampler and <unk> mask)."""
    model = GPT.from_pretrained(tiny_folder).eval()
    tok = byte_tokenizer()

    def run(ids, n, extra_bans=(), ban_unk=None):
        cfg = SamplingConfig().with_bans([*unk_bans(tok, tiny_folder.name, ban_unk), *extra_bans])
        with torch.no_grad():
            return list(model.generate(list(ids), n, Sampler(cfg)))
    return run


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    from cryptogen.client.local_server import LocalServer
    from cryptogen.dealer.service import DealerServer

    d = tmp_path_factory.mktemp("dealer")
    dealer = DealerServer(listen="127.0.0.1:0", state_dir=str(d / "state"), out_dir=str(d)).start()
    srv = LocalServer(str(tiny_folder), workers=1, max_sessions=2, extra=["--dealer", str(dealer.server_file)])
    srv.start()
    srv.dealer = dealer
    yield srv
    srv.stop()
    dealer.stop()


class Proxy:
    """``cryptogen proxy`` in its own process, with Ray unimportable there."""

    def __init__(self, conn_file, tmp: Path, *args):
        self.log = tmp / "proxy.log"
        code = ("import sys; sys.modules['ray'] = None\n"
                "from cryptogen.cli import app\n"
                f"app(['proxy', '--connect', {str(conn_file)!r}, '--listen', '127.0.0.1:0', *{list(args)!r}])\n")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not (m := re.search(r"endpoint at (http://\S+/v1)", self.text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the proxy did not start: " + self.text()[-2000:])
            time.sleep(0.1)
        self.url = m.group(1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, api_key: str = "unused"):
        import openai
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    p = Proxy(server.connection_file, tmp_path_factory.mktemp("proxy"), "--provider", "dealer",
              "--dealer", str(server.dealer.client_file))
    yield p
    p.stop()


@pytest.mark.slow
def test_models_and_the_default_unk_mask(proxy):
    assert "<unk> banned" in proxy.text()
    models = proxy.client().models.list().data
    assert [m.id for m in models] == ["wikitext2"]
    assert models[0].model_extra["banned_token_ids"] == [60] and models[0].model_extra["context_length"] == 64


@pytest.mark.slow
def test_completion_equals_plaintext_greedy_under_the_unk_mask(proxy, greedy):
    prompt = [14, 66]  # plaintext greedy picks "<" (60) here unless it is banned
    assert greedy(prompt, 3, ban_unk=False)[0] == 60
    raw = proxy.client().completions.with_raw_response.create(
        model="wikitext2", prompt=prompt, max_tokens=3, temperature=0, extra_body={"return_token_ids": True})
    out = raw.parse()
    want = greedy(prompt, 3)
    assert out.choices[0].model_extra["token_ids"] == want and 60 not in want
    assert out.choices[0].text == byte_tokenizer().decode(want) and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (2, 3, 5)
    assert re.fullmatch(r"prefill_ms=[\d.]+, ms_per_token=[\d.]+", raw.headers["x-cryptogen-timing"])


@pytest.mark.slow
def test_streaming_sends_one_event_per_token_as_generated_with_logit_bias(proxy, greedy):
    prompt = [3, 17]
    want = greedy(prompt, 3, extra_bans=[231])  # 231 is the unbiased first token
    assert greedy(prompt, 1) == [231] and want[0] != 231
    raw = proxy.client().completions.with_raw_response.create(
        model="wikitext2", prompt=prompt, max_tokens=3, temperature=0, stream=True, logit_bias={"231": -100},
        extra_body={"return_token_ids": True})
    assert re.fullmatch(r"prefill_ms=[\d.]+", raw.headers["x-cryptogen-timing"])
    chunks, times = [], []
    for c in raw.parse():
        chunks.append(c)
        times.append(time.monotonic())
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == want
    assert len(chunks) == 3 and times[-1] - times[0] > 0.1  # one event per token, as each is sampled
    assert "".join(c.choices[0].text for c in chunks) == byte_tokenizer().decode(want)
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].model_extra["timing"]["ms_per_token"] > 0


@pytest.mark.slow
def test_chat_uses_the_plain_text_template(proxy, greedy):
    from cryptogen.client.openai_api import chat_prompt

    messages = [{"role": "user", "content": "?"}]  # short: the prompt's prefill is most of the time
    ids = list(chat_prompt(messages).encode())
    assert ids == list(b"User: ?\nAssistant:")
    out = proxy.client().chat.completions.create(model="wikitext2", messages=messages, max_tokens=1, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == byte_tokenizer().decode(greedy(ids, 1))
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 1


@pytest.mark.slow
def test_two_concurrent_streams_and_a_third_request_gets_429(proxy, greedy):
    import openai

    prompts, n = ([9, 100, 4], [42, 7, 19]), 3
    got, first, errors = {}, [threading.Event(), threading.Event()], []

    def stream(i):
        try:
            s = proxy.client().completions.create(model="wikitext2", prompt=prompts[i], max_tokens=n, temperature=0,
                                                  stream=True, extra_body={"return_token_ids": True})
            got[i] = []
            for c in s:
                got[i] += c.choices[0].model_extra["token_ids"]
                first[i].set()
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)
            first[i].set()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for e in first:
        assert e.wait(300)
    assert not errors, errors
    busy = len(got[0]) < n and len(got[1]) < n  # both sessions still open: the server (2 sessions) is full
    with pytest.raises(openai.RateLimitError) as err:
        proxy.client().completions.create(model="wikitext2", prompt=[1, 2], max_tokens=2, temperature=0)
    assert busy, "a stream finished before the third request: the test's timing assumption failed"
    assert err.value.status_code == 429 and err.value.body["code"] == "server_busy"
    assert int(err.value.response.headers["retry-after"]) > 0
    for t in threads:
        t.join(300)
    assert not errors and [got[0], got[1]] == [greedy(p, n) for p in prompts]


@pytest.mark.slow
def test_bad_request_and_unknown_route_in_openai_format(proxy):
    import openai

    c = proxy.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="wikitext2", prompt="hello", max_tokens=100)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="wikitext2", messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="wikitext2", input="hi")
    assert e.value.body["code"] == "not_found"


@pytest.mark.slow
def test_server_down_is_503_and_a_local_key_is_checked(proxy, server, tmp_path):
    import openai

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    info = json.loads(Path(server.connection_file).read_text())
    info["address"] = f"127.0.0.1:{dead_port}"
    (tmp_path / "dead.json").write_text(json.dumps(info))
    dead = Proxy(tmp_path / "dead.json", tmp_path, "--local-api-key", "k" * 32)
    try:
        assert "not reachable now" in dead.text()
        with pytest.raises(openai.AuthenticationError) as e:
            dead.client("wrong").completions.create(model="wikitext2", prompt="hi", max_tokens=1)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.InternalServerError) as e:
            dead.client("k" * 32).completions.create(model="wikitext2", prompt="hi", max_tokens=1)
        assert e.value.status_code == 503 and e.value.body["code"] == "server_unreachable"
    finally:
        dead.stop()
    server.stop()  # the running proxy's pooled connections die with it
    with pytest.raises(openai.InternalServerError) as e:
        proxy.client().completions.create(model="wikitext2", prompt=[3, 17], max_tokens=1, temperature=0)
    assert e.value.status_code == 503 and e.value.body["type"] == "server_error"


def test_loopback_proxy_refuses_browser_origins_and_foreign_hosts():
    """A web page cannot drive the user's private sessions: a cross-site request (Origin header)
    or a DNS-rebound Host gets 403 in OpenAI's error format (the app called as ASGI, no server)."""
    import asyncio
    import json as _json

    from cryptogen.client.proxy import create_app

    app = create_app(up=None)

    async def call(headers):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/v1/models", "raw_path": b"/v1/models", "root_path": "",
                 "query_string": b"", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555),
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        out = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            out.append(msg)
        await app(scope, receive, send)
        status = next(m["status"] for m in out if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
        return status, _json.loads(body)
    status, body = asyncio.run(call({"host": "127.0.0.1:8000", "origin": "https://evil.example"}))
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, _ = asyncio.run(call({"host": "evil.example:8000"}))
    assert status == 403
