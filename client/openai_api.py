"""The OpenAI API surface of ``cryptogen proxy``: request checks with OpenAI's error format, the
plain-text chat template, text assembly (stop sequences, whole characters) and the response and
stream-chunk shapes. No I/O here; ``proxy.py`` runs the secure sessions and serves HTTP.

Differences from OpenAI's API, each a clear 400 where a request asks for them: one prompt and one
choice per request (``n`` = 1), no ``logprobs``/``echo``/``suffix``/penalties/tools. Extensions
(as in vLLM): ``top_k``, and ``return_token_ids`` (each choice or chunk carries its ``token_ids``).
"""
from __future__ import annotations

import math
import reprlib
import time
import uuid
from dataclasses import dataclass, field

from cryptogen.sampling import SamplingConfig

DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions; a secure token takes seconds
CHAT_STOP = "\nUser:"  # the template's next turn


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    TYPES = {429: "rate_limit_error"}  # else invalid_request_error (4xx) or server_error (5xx)

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status) or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class ModelInfo:
    """What the proxy knows of the served model (from the server's welcome)."""
    name: str
    tokenizer: object | None  # tokenizers.Tokenizer
    n_positions: int
    vocab_size: int
    bans: tuple[int, ...] = ()  # banned token ids (the <unk> mask of the shipped models)
    eos_id: int | None = None


@dataclass
class GenRequest:
    kind: str  # "completion" | "chat"
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# ---- request checks -----------------------------------------------------------------------------
UNSUPPORTED = {  # field: (values that are fine, why others are not)
    "n": ((1,), "one choice per request"), "best_of": ((1,), "one choice per request"),
    "logprobs": ((False, 0), "logprobs are not returned"), "top_logprobs": ((0,), "logprobs are not returned"),
    "echo": ((False,), "echo is not supported"), "suffix": (("",), "suffix (insertion) is not supported"),
    "presence_penalty": ((0,), "penalties are not supported"),
    "frequency_penalty": ((0,), "penalties are not supported"),
    "tools": (([],), "tools are not supported"), "functions": (([],), "functions are not supported"),
}


def _unsupported(body: dict) -> None:
    for key, (fine, why) in UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and v not in fine:
            raise bad(f"{key}={v!r} is not supported by this endpoint: {why}", key, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format is not supported (plain text only)", "response_format", "unsupported_parameter")


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    # an int is compared as is (math.isfinite would overflow on a huge one); NaN fails every comparison
    if not ok or not (isinstance(v, int) or math.isfinite(v)) or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"{key} must be {kind} in [{lo:g}, {hi:g}], got {reprlib.repr(v)}", key, "invalid_value")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    return tuple(stops)


def _sampling(body: dict, info: ModelInfo) -> SamplingConfig:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be greater than 0 (use temperature 0 for greedy)", "top_p", "invalid_value")
    top_k = max(0, _number(body, "top_k", 0, -1, info.vocab_size, integer=True))  # -1 (vLLM): no cut
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True)
    seed = None if seed is None else seed % 2 ** 63
    raw = body.get("logit_bias") or {}
    if not isinstance(raw, dict):
        raise bad("logit_bias must map token ids to biases in [-100, 100]", "logit_bias", "invalid_value")
    bias = {}
    for k, b in raw.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise bad(f"logit_bias: {k!r} is not a token id", "logit_bias", "invalid_value") from None
        if not 0 <= tid < info.vocab_size:
            raise bad(f"logit_bias: token {tid} is outside the vocabulary of {info.vocab_size}", "logit_bias",
                      "invalid_value")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad(f"logit_bias: the bias of token {tid} must be in [-100, 100]", "logit_bias", "invalid_value")
        bias[tid] = b
    cfg = SamplingConfig(temperature, top_k, seed, bias, top_p).with_bans(info.bans)
    if len(cfg.banned) >= info.vocab_size:
        raise bad("logit_bias bans every token", "logit_bias", "invalid_value")
    return cfg


def _common(kind: str, body: dict, info: ModelInfo, ids: list[int], stop: tuple[str, ...]) -> GenRequest:
    if not isinstance(body.get("model", ""), str):
        raise bad("model must be a string", "model")
    _unsupported(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if not ids:
        raise bad("the prompt has no tokens", "prompt" if kind == "completion" else "messages")
    room = info.n_positions - len(ids) + 1  # the last new token needs no position of its own
    max_tokens = _number(body, key, min(DEFAULT_MAX_TOKENS, max(room, 1)), 1, 2 ** 31 - 1, integer=True)
    if max_tokens > room:
        raise bad(f"this model's context is {info.n_positions} tokens; the prompt is {len(ids)} tokens and "
                  f"{key} is {max_tokens}: reduce the prompt or {key}", key, "context_length_exceeded")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options must be an object", "stream_options")
    return GenRequest(kind, ids, max_tokens, _sampling(body, info), stop, stream,
                      bool(opts.get("include_usage", False)), bool(body.get("return_token_ids", False)))


def _encode(info: ModelInfo, text: str, param: str) -> list[int]:
    if info.tokenizer is None:
        raise bad(f"the server sent no tokenizer: send the {param} as token ids", param)
    return info.tokenizer.encode(text).ids


def parse_completion(body, info: ModelInfo) -> GenRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        ids = _encode(info, p, "prompt")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < info.vocab_size for t in p):
            raise bad(f"prompt token ids must be in [0, {info.vocab_size})", "prompt", "invalid_value")
        ids = list(p)
    elif isinstance(p, list) and len(p) > 1:
        raise bad("one prompt per request (batches of prompts are not supported)", "prompt", "unsupported_parameter")
    else:
        raise bad("prompt must be a string or a list of token ids", "prompt")
    return _common("completion", body, info, ids, _stop(body))


def chat_prompt(messages) -> str:
    """The plain-text chat template of the shipped models (language models of plain text, no chat
    tuning): system text first, then one ``User: ...`` / ``Assistant: ...`` line per turn, ending
    with ``Assistant:`` for the model to continue; the reply stops at the next ``\\nUser:``."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, developer, user or assistant", f"messages[{i}].role")
        text = _content(m.get("content"), i)
        if m["role"] in ("system", "developer"):
            system.append(text)
        else:
            turns.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {text}")
    head = "\n".join(system) + "\n\n" if system else ""
    return head + "\n".join(turns + ["Assistant:"])


def _content(c, i: int) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content must be text (images and other parts are not supported)",
              f"messages[{i}].content")


def parse_chat(body, info: ModelInfo) -> GenRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    ids = _encode(info, chat_prompt(body.get("messages")), "messages")
    stops = _stop(body)
    return _common("chat", body, info, ids, stops + ((CHAT_STOP,) if CHAT_STOP not in stops else ()))


# ---- text out -----------------------------------------------------------------------------------
class TextAssembler:
    """Token ids -> text deltas: whole characters only, stop sequences cut (text that could still
    become a stop sequence is held back until it cannot)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos_id: int | None = None):
        self.tok, self.stop, self.eos_id = tokenizer, stop, eos_id
        self.ids: list[int] = []
        self.sent = ""
        self.finished: str | None = None  # "stop" once a stop sequence or the end-of-text token came

    def push(self, token: int) -> str:
        if self.finished:
            return ""
        if token == self.eos_id:
            self.finished = "stop"
            return self._emit(self._text())
        self.ids.append(token)
        text = self._text()
        cuts = [i for i in (text.find(s, max(0, len(self.sent) - len(s) + 1)) for s in self.stop) if i >= 0]
        if cuts:
            self.finished = "stop"
            return self._emit(text[:min(cuts)])
        safe = len(text)
        while safe > len(self.sent) and text[safe - 1] == "\ufffd":  # an incomplete character
            safe -= 1
        held = True
        while held:  # hold back a tail that may be the start of a stop sequence
            held = False
            for s in self.stop:
                k = next((k for k in range(min(len(s) - 1, safe - len(self.sent)), 0, -1)
                          if text[:safe].endswith(s[:k])), 0)
                if k:
                    safe, held = safe - k, True
        return self._emit(text[:safe])

    def flush(self) -> str:
        """At the end: whatever was held back (unless a stop sequence ended the text)."""
        return "" if self.finished else self._emit(self._text())

    def _text(self) -> str:
        return self.tok.decode(self.ids) if self.tok is not None else ""

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.sent):] if upto.startswith(self.sent) else ""
        if len(upto) > len(self.sent):
            self.sent = upto
        return delta


def usage(req: GenRequest, n_generated: int) -> dict:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": n_generated, "total_tokens": n + n_generated}


def _choice(req: GenRequest, text: str, finish: str | None, ids: list[int], chunk: bool) -> dict:
    if req.kind == "chat":
        key, msg = ("delta", {"content": text}) if chunk else ("message", {"role": "assistant", "content": text})
        c = {"index": 0, key: msg, "logprobs": None, "finish_reason": finish}
    else:
        c = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if req.return_token_ids:
        c["token_ids"] = ids
    return c


def response(req: GenRequest, model: str, text: str, finish: str, ids: list[int]) -> dict:
    out = {"id": ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id,
           "object": "chat.completion" if req.kind == "chat" else "text_completion",
           "created": req.created, "model": model, "choices": [_choice(req, text, finish, ids, False)],
           "usage": usage(req, len(ids))}
    if req.return_token_ids:
        out["prompt_token_ids"] = req.prompt_ids
    return out


def chunk(req: GenRequest, model: str, text: str | None, finish: str | None = None, ids: list[int] = (),
          first: bool = False, extra: dict | None = None) -> dict:
    """One stream event: a token's text delta (``text`` None: no choice, e.g. the usage chunk)."""
    choices = []
    if text is not None:
        c = _choice(req, text, finish, list(ids), True)
        if req.kind == "chat" and first:
            c["delta"]["role"] = "assistant"
        choices.append(c)
    out = {"id": ("chatcmpl-" if req.kind == "chat" else "cmpl-") + req.id,
           "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
           "created": req.created, "model": model, "choices": choices}
    out.update(extra or {})
    return out
