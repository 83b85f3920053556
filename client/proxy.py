"""``cryptogen proxy``: an OpenAI-compatible HTTP endpoint on the user's machine.

Tools that speak the OpenAI API (the ``openai`` SDK, LangChain, curl) point their ``base_url``
at it. Each request becomes one secure session of this process against a remote
``cryptogen serve``: the proxy is the client of the protocol, so the secret key, the prompt, the
client's shares, the logits and the sampled tokens stay on this machine; the HTTP side listens on
loopback unless told otherwise (then with a local API key). No Ray here.

Sessions run in threads (``Connection.generate`` is blocking), one per request, over a pool of
authenticated control connections (each keeps its HE keys between sessions). Tokens go to the
HTTP side as they are sampled: a streamed request gets one server-sent event per token. The
response starts after the first token, so an error before it (busy, unreachable, bad input) is an
HTTP status in OpenAI's error format: 400 bad input, 429 busy, 503 server unreachable, 502/504
other failures of the server.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import sys
import threading
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cryptogen.cli_common import check_choice, check_file, check_int, split_host_port
from cryptogen.data import EOS
from cryptogen.mpc.errors import ChannelError
from cryptogen.net.control import ProtocolError, RemoteError
from cryptogen.sampling import UNK, unk_bans

from . import openai_api as oa
from .remote import MODES, PROVIDERS, ConnectError, ServerInfo, connect

MAX_IDLE = 8  # pooled connections kept between requests


class ProxyConfigError(ValueError):
    """Bad proxy options (the CLI prints them as one line)."""


@dataclass
class ProxyOptions:
    connect: str  # the connection file a ``cryptogen serve`` wrote
    listen: str = "127.0.0.1:8000"
    local_api_key: str | None = None  # clients must send ``Authorization: Bearer KEY``
    allow_remote: bool = False  # listen on a non-loopback address (needs local_api_key)
    provider: str = "he"
    mode: str = "kv-reuse"
    dealer: str | None = None
    ban_unk: bool | None = None  # None: on for the shipped models
    max_sessions: int = 16  # sessions of this proxy at once (the server has its own limit)

    def address(self) -> tuple[str, int]:
        """(host, port) to listen on, after every option is checked (ProxyConfigError, one line):
        called first by ``run_proxy``, before the connection file is read or a socket opened."""
        host, port = split_host_port("--listen", self.listen, "127.0.0.1:8000 (port 0: any free port)",
                                     err=ProxyConfigError)
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not self.allow_remote:
            raise ProxyConfigError(f"--listen {host} is not a loopback address: the endpoint would accept prompts "
                                   "from the network; add --allow-remote and a --local-api-key to do that")
        if not loopback and not self.local_api_key:
            raise ProxyConfigError("listening beyond loopback needs a local API key (--local-api-key or "
                                   "CRYPTOGEN_PROXY_API_KEY)")
        if self.local_api_key is not None and (not isinstance(self.local_api_key, str) or not self.local_api_key.strip()
                                               or any(c.isspace() for c in self.local_api_key)):
            raise ProxyConfigError("--local-api-key is empty or has spaces; use a key without spaces")
        check_choice("--mode", self.mode, MODES, err=ProxyConfigError)
        check_choice("--provider", self.provider, PROVIDERS, err=ProxyConfigError)
        if self.provider == "dealer" and not self.dealer:
            raise ProxyConfigError("--provider dealer needs --dealer FILE (the dealer's client connection file)")
        if self.dealer is not None:
            check_file("--dealer", self.dealer, "the dealer's client connection file (dealer-client.json)",
                       err=ProxyConfigError)
        check_int("--max-sessions", self.max_sessions, 1, err=ProxyConfigError)
        if self.ban_unk is not None and not isinstance(self.ban_unk, bool):
            raise ProxyConfigError(f"ban_unk {self.ban_unk!r} is not allowed; use True, False or None")
        return host, port


def _say(msg: str) -> None:
    print(f"[proxy] {msg}", file=sys.stderr, flush=True)


class Pool:
    """Authenticated control connections, reused between requests (one session at a time each)."""

    def __init__(self, opts: ProxyOptions):
        self.opts = opts
        self.idle: list = []
        self.lock = threading.Lock()

    def new(self):
        return connect(self.opts.connect, dealer=self.opts.dealer)

    def acquire(self):
        """(connection, reused): an idle live one, else a new one."""
        while True:
            with self.lock:
                conn = self.idle.pop() if self.idle else None
            if conn is None:
                return self.new(), False
            if not conn.chan.peer_gone:
                return conn, True
            _drop(conn)

    def release(self, conn, healthy: bool) -> None:
        with self.lock:
            if healthy and not conn.chan.peer_gone and len(self.idle) < MAX_IDLE:
                self.idle.append(conn)
                return
        _drop(conn)

    def close(self) -> None:
        with self.lock:
            conns, self.idle = self.idle, []
        for conn in conns:
            _drop(conn)


def _drop(conn) -> None:
    if conn.chan.peer_gone:
        conn.chan.abort()
    else:
        threading.Thread(target=conn.close, daemon=True).start()  # says goodbye without blocking anyone


class Upstream:
    """The protocol side: the served model's description and one thread per secure session."""

    def __init__(self, opts: ProxyOptions):
        self.opts, self.pool = opts, Pool(opts)
        self._info: oa.ModelInfo | None = None
        self._lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(opts.max_sessions)

    def info_sync(self) -> oa.ModelInfo:
        with self._lock:
            if self._info is None:
                conn = self.pool.new()
                self._info = model_info(conn, self.opts.ban_unk)
                self.pool.release(conn, True)
            return self._info

    async def info(self) -> oa.ModelInfo:
        if self._info is not None:
            return self._info
        try:
            return await asyncio.to_thread(self.info_sync)
        except Exception as e:  # noqa: BLE001 - mapped to OpenAI's format
            raise api_error(e) from None

    def start(self, req: oa.GenRequest) -> "Generation":
        if not self.slots.acquire(blocking=False):
            raise oa.APIError(429, f"the proxy is running {self.opts.max_sessions} secure sessions; retry later",
                              code="proxy_busy", headers={"Retry-After": "5"})
        return Generation(self, req, asyncio.get_running_loop())


def model_info(conn, ban_unk: bool | None) -> oa.ModelInfo:
    tok = conn.tokenizer
    bans = tuple(unk_bans(tok, conn.model_name, ban_unk))
    return oa.ModelInfo(conn.model_name or "cryptogen", tok, conn.cfg.n_positions, conn.cfg.vocab_size, bans,
                        tok.token_to_id(EOS) if tok is not None else None)


class Generation:
    """One request's secure session, run in its own thread; tokens come out through a queue."""

    def __init__(self, up: Upstream, req: oa.GenRequest, loop):
        self.up, self.req, self.loop = up, req, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timings: list = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="cryptogen-proxy-session", daemon=True).start()

    def cancel(self) -> None:
        """Stop after the current step (the session ends cleanly; the connection is reused)."""
        self._stop.set()

    async def next(self) -> tuple[str, object]:
        return await self.queue.get()

    def timing(self) -> dict:
        t = list(self.timings)
        dec = [s.seconds for s in t if s.phase == "decode"]
        return {"prefill_ms": round(1000 * t[0].seconds, 1) if t else None,
                "ms_per_token": round(1000 * sum(dec) / len(dec), 1) if dec else None}

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down)
            pass

    def _run(self) -> None:
        try:
            for attempt in (0, 1):
                if self._session(retry_stale=attempt == 0):
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the HTTP side
            self._put(("error", e))
        else:
            self._put(("done", None))
        finally:
            self.up.slots.release()

    def _session(self, retry_stale: bool) -> bool:
        """Run the session; False: a pooled connection turned out stale before any work (retry)."""
        conn, reused = self.up.pool.acquire()
        r, o = self.req, self.up.opts
        # token-only output unless the request needs the logits (top-k / top-p cut the distribution)
        reveal = "logits" if r.sampling.top_k or r.sampling.top_p < 1 else "token"
        gen = conn.generate(r.prompt_ids, r.max_tokens, r.sampling, mode=o.mode, provider=o.provider,
                            on_step=self.timings.append, reveal=reveal)
        n, healthy = 0, False
        try:
            for token in gen:
                n += 1
                self._put(("token", int(token)))
                if self._stop.is_set():
                    break
            healthy = True
        except RemoteError as e:
            healthy = e.code == "busy"  # refused before any work: the connection is fine
            if n == 0 and reused and retry_stale and e.code == "timeout":
                return False
            raise
        except (ChannelError, ProtocolError):
            if n == 0 and reused and retry_stale:
                return False
            raise
        finally:
            gen.close()
            self.up.pool.release(conn, healthy)
        return True


def api_error(e: BaseException) -> oa.APIError:
    """A failure as an OpenAI-format error with the right status."""
    if isinstance(e, oa.APIError):
        return e
    if isinstance(e, RemoteError):
        if e.code == "busy":
            after = int(e.retry_after or 30)
            return oa.APIError(429, f"the CryptoGen server is busy: {e}", code="server_busy",
                               headers={"Retry-After": str(after)})
        if e.code == "bad_request":
            return oa.APIError(400, f"the CryptoGen server refused the request: {e}", code="bad_request")
        if e.code == "timeout":
            return oa.APIError(504, f"the CryptoGen server timed out: {e}", code="upstream_timeout")
        return oa.APIError(502, f"the secure session failed: {e}", code=f"upstream_{e.code}")
    if isinstance(e, (ConnectError, ChannelError, ProtocolError, OSError)):
        return oa.APIError(503, f"the CryptoGen server is unreachable: {e}", code="server_unreachable")
    if isinstance(e, ValueError):
        return oa.APIError(400, str(e), code="invalid_value")
    return oa.APIError(500, f"internal error in the proxy: {e.__class__.__name__}", code="internal_error")


def _error_response(err: oa.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _timing_header(t: dict) -> dict:
    parts = [f"{k}={v}" for k, v in t.items() if v is not None]
    return {"X-CryptoGen-Timing": ", ".join(parts)} if parts else {}


LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def create_app(up: Upstream, local_api_key: str | None = None) -> FastAPI:
    async def _auth(request: Request) -> None:
        if local_api_key is None:
            # loopback without a key: refuse what a web page could send (cross-site requests carry an
            # Origin; DNS rebinding carries a foreign Host), so only local programs reach the session
            host = request.headers.get("host", "").rsplit(":", 1)[0]
            if host not in LOCAL_HOSTS or request.headers.get("origin"):
                raise oa.APIError(403, "this proxy answers local programs only (no browser origins, Host must "
                                       "be localhost); bind elsewhere with --allow-remote and a --local-api-key",
                                  code="forbidden")
        if local_api_key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {local_api_key}".encode()):
                raise oa.APIError(401, "invalid API key for this proxy (its --local-api-key)", code="invalid_api_key")

    app = FastAPI(title="CryptoGen proxy", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(_auth)])

    @app.exception_handler(oa.APIError)
    async def _api_error(request, exc: oa.APIError):
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return _error_response(oa.APIError(exc.status_code, str(exc.detail), code="not_found"
                                           if exc.status_code == 404 else None))

    def _model(info: oa.ModelInfo) -> dict:
        return {"id": info.name, "object": "model", "created": 0, "owned_by": "cryptogen",
                "context_length": info.n_positions, "banned_token_ids": list(info.bans)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model(await up.info())]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        info = await up.info()
        if name != info.name:
            raise oa.APIError(404, f"the model {name!r} does not exist; this proxy serves {info.name!r}",
                              "model", "model_not_found")
        return _model(info)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, oa.parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, oa.parse_chat)

    async def _generate(request: Request, parse):
        try:
            body = await request.json()
        except ValueError:
            raise oa.bad("the request body is not valid JSON") from None
        info = await up.info()
        req = parse(body, info)
        gen = up.start(req)

        async def watched():
            """The next event, or ``_ClientGone`` once the HTTP client has hung up (its session stops)."""
            nxt = asyncio.ensure_future(gen.next())
            while not (await asyncio.wait({nxt}, timeout=0.5))[0]:
                if await request.is_disconnected():
                    nxt.cancel()
                    raise _ClientGone()
            return nxt.result()
        try:
            first = await watched()
            if first[0] == "error":
                raise api_error(first[1])
        except _ClientGone:
            gen.cancel()
            return Response(status_code=499)
        except BaseException:
            gen.cancel()
            raise
        if req.stream:  # from here on Starlette stops the stream (and so the session) on a hang-up
            head = _timing_header(gen.timing())
            return StreamingResponse(_sse(gen, req, info, _tokens(gen, req, info, first, gen.next)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **head})
        text, ids, finish = [], [], "length"
        try:
            async for token, delta, finish in _tokens(gen, req, info, first, watched):
                text.append(delta)
                ids.append(token)
        except _ClientGone:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - mapped to OpenAI's format
            raise api_error(e) from None
        finally:
            gen.cancel()
        return JSONResponse(oa.response(req, info.name, "".join(text), finish, ids),
                            headers=_timing_header(gen.timing()))

    return app


class _ClientGone(Exception):
    pass


async def _tokens(gen: Generation, req: oa.GenRequest, info: oa.ModelInfo, item, next_item):
    """(token, text delta, finish reason or None) per generated token, until the last one."""
    asm = oa.TextAssembler(info.tokenizer, req.stop, info.eos_id)
    n = 0
    while True:
        kind, value = item
        if kind == "error":
            raise value
        if kind == "done":  # the session ended without the last token (should not happen)
            return
        n += 1
        delta = asm.push(value)
        finish = asm.finished or ("length" if n >= req.max_tokens else None)
        if finish == "length":
            delta += asm.flush()
        yield value, delta, finish
        if finish:
            gen.cancel()
            return
        item = await next_item()


async def _sse(gen: Generation, req: oa.GenRequest, info: oa.ModelInfo, tokens):
    """Server-sent events: one per token as it is sampled, the usage, ``[DONE]``."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
    n = 0
    try:
        async for token, delta, finish in tokens:
            n += 1
            extra = None
            if finish:  # the last token's event also carries the usage (unless asked apart) and timing
                extra = {"timing": gen.timing(), **({} if req.include_usage else {"usage": oa.usage(req, n)})}
            yield event(oa.chunk(req, info.name, delta, finish, [token], first=n == 1, extra=extra))
        if req.include_usage:
            yield event(oa.chunk(req, info.name, None, extra={"usage": oa.usage(req, n)}))
        yield "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield event(api_error(e).body())
    finally:
        gen.cancel()


def run_proxy(opts: ProxyOptions) -> None:
    """The ``cryptogen proxy`` command: serve until interrupted."""
    import uvicorn

    host, port = opts.address()
    server_info = ServerInfo.from_file(opts.connect)  # a bad file is a one-line error before anything starts
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ProxyConfigError(f"cannot listen on {opts.listen}: {e.strerror or e}") from None
    up = Upstream(opts)
    try:
        info = up.info_sync()
        ban = (f"{UNK} banned ({len(info.bans)} token ids; the default for the shipped models, --no-ban-unk to allow)"
               if info.bans else f"{UNK} allowed")
        _say(f"connected to {info.name} at {server_info.host}:{server_info.port} (TLS, pinned); provider "
             f"{opts.provider}, {opts.mode}; {ban}")
    except Exception as e:  # noqa: BLE001 - the proxy starts anyway; requests get 503 until the server is up
        _say(f"the server is not reachable now ({api_error(e).message}); requests get 503 until it is")
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    _say(f"OpenAI-compatible endpoint at http://{shown}:{bound[1]}/v1"
         + (" (local API key required)" if opts.local_api_key else ""))
    config = uvicorn.Config(create_app(up, opts.local_api_key), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        up.pool.close()
        sock.close()
