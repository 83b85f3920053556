"""The server's gateway: TLS control connections, API keys, the session table, and the driver.

It runs in the model owner's process on the Ray cluster's head (``cryptogen serve``). It holds
the server's certificate, the API key, the worker pool and, per session, the scheduler
(``cryptogen.driver.Driver`` over ``RayRunner``): server shares move between workers as Ray refs
inside the server's cluster. It never holds a secret key, a prompt, a client share or a logit.

Per connection (one thread; see ``cryptogen.net.control`` for the messages):
  1. ``hello``: the API key is checked (constant time) before any work; a wrong key is refused.
  2. ``open``: at most ``max_sessions`` at once (else "busy, retry after N s"); the client's public
     context goes to every worker, which checks it against the server's own HE parameters; each
     worker link gets fresh 256-bit tokens, handed to the client over this connection only.
  3. ``forward`` steps: validated (positions in range, continuing the cache, within the KV-cache
     budget), run, checkpointed (every worker's encrypted cache, kept by this process), answered.
     A worker whose process died is restarted by Ray: the step is redone from the checkpoint
     (``retry``; server/session.py).
  4. The session ends on ``end``, on the idle timeout or on an error: every worker frees its links,
     pools and cache (``ServerPool.close``), at once. A client that disconnects is parked for
     ``resume_grace`` seconds (its workers' state freed at once, its checkpoints kept) and may
     ``resume`` on a new connection with its session's secret.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import ray

from cryptogen import secure_plan as sp
from cryptogen.mpc.errors import ChannelError, MPCError
from cryptogen.net import control
from cryptogen.net.channel import IdleTimeout, TLSChannel, run
from cryptogen.net.tls import same_secret, server_context
from cryptogen.driver import Driver
from cryptogen.scheduler.ray_runner import ClientGone, RayRunner, ServerPool, WorkerDied

from .session import ServerSession
from .stats import GatewayStats

# TLS handshake to hello: 10 s was too short for a client process with 8 sessions opening at once (its
# threads' Pyfhel key generation holds the GIL); silent connections are still capped (MAX_UNAUTHENTICATED)
HELLO_TIMEOUT = 30.0
HELLO_CAP = 64 << 10  # before the API key is checked, a connection may send this much
MAX_UNAUTHENTICATED = 64
BUSY_RETRY_S = 30
MAX_RETRIES = 3  # worker restarts survived by one step


@dataclass(frozen=True)
class GatewayConfig:
    max_sessions: int = 4
    idle_timeout: float = 600.0
    link_timeout: float = 60.0
    token_only: bool = False  # refuse steps that open logits (protects the LM head; no eval)
    resume_grace: float = 20.0  # a dropped client may resume its session for this long (0: never)
    kv_budget: int = 4 << 30  # bytes of encrypted KV cache one session may hold, all workers


class Gateway:
    def __init__(self, pool: ServerPool, cfg, plan, layer_groups: int, he_config, tokenizer_json: str | None,
                 api_key: str, tls: tuple[str, str], options: GatewayConfig = GatewayConfig(), dealer=None,
                 model_name: str = ""):
        self.pool, self.cfg, self.plan, self.he_config = pool, cfg, plan, he_config
        self.layer_groups = layer_groups
        self.tokenizer_json, self.api_key, self.options, self.dealer = tokenizer_json, api_key, options, dealer
        self.model_name = model_name
        self.stats = GatewayStats()
        self.ctx_cap = control.public_context_cap(he_config, len(sp.rotation_steps(cfg, plan, he_config.n)))
        self._ssl = server_context(*tls)
        self._threads: set[threading.Thread] = set()
        self._unauthenticated = 0
        self._live: dict[str, TLSChannel] = {}
        self._parked: dict[str, ServerSession] = {}  # sessions whose client went away, resumable
        self._lock = threading.Lock()
        self.server = None

    # ---- listening ----------------------------------------------------------------------------
    def listen(self, host: str, port: int) -> tuple[str, int]:
        self.server = run(asyncio.start_server(self._on_connect, host, port, ssl=self._ssl,
                                               ssl_handshake_timeout=HELLO_TIMEOUT))
        return self.server.sockets[0].getsockname()[:2]

    async def _on_connect(self, reader, writer) -> None:
        with self._lock:  # a flood of connections gets no thread and no buffer each
            crowded = (len(self._threads) >= 4 * self.options.max_sessions + 16
                       or self._unauthenticated >= MAX_UNAUTHENTICATED)
            if not crowded:
                self._unauthenticated += 1
        if crowded:
            self.stats.refuse("busy")
            writer.transport.abort()
            return
        # until the API key is checked: small frames, nothing read ahead, a short timeout
        chan = TLSChannel(reader, writer, max_frame=HELLO_CAP, timeout=HELLO_TIMEOUT, max_ahead=HELLO_CAP)
        th = threading.Thread(target=self._serve, args=(chan,), name="cryptogen-session", daemon=True)
        with self._lock:
            self._threads.add(th)
        th.start()

    def close(self) -> None:
        if self.server is not None:
            from cryptogen.net.channel import io_loop
            io_loop().call_soon_threadsafe(self.server.close)
        with self._lock:
            live = list(self._live.values())
            parked, self._parked = list(self._parked.values()), {}
        for chan in live:  # said first, so a client does not try to resume on a server going away
            control.send_error(chan, "shutdown", "the server is shutting down and this session is lost; "
                                                 "generate again when it is back")
            chan.abort()
        for sess in parked:
            self._free(sess)

    # ---- one connection -------------------------------------------------------------------------
    def _serve(self, chan: TLSChannel) -> None:
        authenticated = False
        try:
            try:
                hello = control.recv(chan, "hello")
            finally:
                with self._lock:
                    self._unauthenticated -= 1
            if not same_secret(str(hello.get("api_key", "")), self.api_key):
                self.stats.refuse("auth")
                control.send_error(chan, "auth", "the server refused the API key; use the key from the server's "
                                                 "connection file (cryptogen serve --connection-file)")
                return
            authenticated = True
            if hello.get("version") != control.VERSION:
                raise control.ProtocolError(f"this server speaks protocol version {control.VERSION}; "
                                            "update the client")
            chan.timeout, chan.max_frame = self.options.idle_timeout, self.ctx_cap + 4096
            chan.max_ahead = 2 * chan.max_frame
            control.send(chan, "welcome", version=control.VERSION, model=self.cfg.to_hf(),
                         he=self.he_config.to_dict(), workers=len(self.plan.workers),
                         layer_groups=self.layer_groups, tokenizer=self.tokenizer_json,
                         name=self.model_name, dealer=self.dealer is not None, logits=not self.options.token_only)
            while True:
                msg = control.recv(chan, "open", "resume", "end", "close")
                if msg["type"] == "close":
                    return
                if msg["type"] == "open":  # a stray "end" after a session the server ended is ignored
                    self._session(chan, msg)
                elif msg["type"] == "resume":
                    self._resume(chan, msg)
        except IdleTimeout:
            if authenticated:
                self.stats.timeout()
            control.send_error(chan, "timeout", f"the session was idle for {chan.timeout:.0f} s and was closed")
        except control.ProtocolError as e:
            self.stats.refuse("bad_request")
            control.send_error(chan, "bad_request", str(e))
        except (ChannelError, control.RemoteError, ClientGone):
            pass  # the client went away: its session (if any) was freed in _session
        finally:
            chan.close()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _session(self, chan: TLSChannel, msg: dict) -> None:
        mode = control.need_choice(msg, "mode", control.MODES)
        provider = control.need_choice(msg, "provider", control.PROVIDERS)
        public_context = control.recv_blob(chan, self.ctx_cap, "public context")
        if provider == "dealer" and self.dealer is None:
            raise control.ProtocolError("this server has no dealer (it was started without --dealer); "
                                        "use the dealer-free provider he")
        if not self.stats.opening(self.options.max_sessions):
            control.send_error(chan, "busy", f"the server is busy ({self.options.max_sessions} sessions open); "
                                             f"retry after {BUSY_RETRY_S} s", retry_after=BUSY_RETRY_S)
            return
        sess = ServerSession.new(public_context, mode, provider)
        try:
            links = sess.open_epoch(self.pool)
        except ray.exceptions.RayTaskError as e:
            self._free(sess)
            raise control.ProtocolError(_cause(e)) from None
        except BaseException:
            self._free(sess)
            raise
        control.send(chan, "session", sid=sess.sid, resume=sess.secret, links=links, mode=mode, provider=provider)
        self._run(chan, sess)

    def _resume(self, chan: TLSChannel, msg: dict) -> None:
        """A client whose connection dropped continues its parked session (``resume`` {sid, secret,
        cached}); the reply is ``retry`` {cached, links}, then its steps go on."""
        sid, secret = str(msg.get("sid", ""))[:64], str(msg.get("secret", ""))
        cached = control.need_int(msg, "cached", 0, self.cfg.n_positions)
        with self._lock:
            sess = self._parked.get(sid)
            if sess is not None and same_secret(secret, sess.secret):
                del self._parked[sid]
            else:
                sess = None
        if sess is None:
            raise control.ProtocolError("the server holds no such session to resume (it expired, ended, or the "
                                        "server restarted); start a new generation")
        if sess.expiry is not None:
            sess.expiry.cancel()
        ckpt = sess.checkpoint_at(cached)
        if ckpt is None:
            self._free(sess)
            raise control.ProtocolError(f"the session cannot resume at position {cached}; start a new generation")
        sess.checkpoints = [ckpt]
        try:
            links = self._reopen(sess, ckpt)
        except BaseException:
            self._free(sess)
            raise
        self.stats.recovered("resume")
        control.send(chan, "retry", cached=sess.cached, links=links, reason="the session resumed")
        self._run(chan, sess)

    def _run(self, chan: TLSChannel, sess: ServerSession) -> None:
        """Links, steps; then the session is freed, or parked when its client went away."""
        with self._lock:
            self._live[sess.sid] = chan
        failure, park = None, False  # told to the client only once the session is freed everywhere
        try:
            self._wait_links(chan, self.pool.connect(sess.wsid, self._providers(sess)))
            self._steps(chan, sess)
        except ClientGone:
            park = True
        except (WorkerDied, ray.exceptions.RayTaskError, MPCError) as e:
            if isinstance(e, ChannelError) and chan.peer_gone:
                park = True  # the client left
            else:
                failure = _cause(e)
        except ray.exceptions.RayActorError:
            failure = "a server worker died and could not be restarted"
        finally:
            with self._lock:
                self._live.pop(sess.sid, None)
            try:
                self.pool.close(sess.wsid)
            finally:
                if park and self.options.resume_grace > 0:
                    self._park(sess)
                else:
                    self._free(sess)
        if failure is not None:
            self.stats.failure()
            control.send_error(chan, "session", f"the session failed on the server: {failure}")

    def _park(self, sess: ServerSession) -> None:
        """Keep a session whose client went away for ``resume_grace`` seconds (its checkpoints only)."""
        with self._lock:
            self._parked[sess.sid] = sess
        sess.expiry = threading.Timer(self.options.resume_grace, self._expire, args=(sess.sid,))
        sess.expiry.daemon = True
        sess.expiry.start()

    def _expire(self, sid: str) -> None:
        with self._lock:
            sess = self._parked.pop(sid, None)
        if sess is not None:
            self._free(sess)

    def _free(self, sess: ServerSession) -> None:
        sess.drop()
        self.stats.closing()

    def _providers(self, sess: ServerSession) -> list:
        return [self._provider(sess.provider, sess.tokens[i], i) for i in range(len(self.pool.workers))]

    def _provider(self, name: str, tokens: dict, worker: int):
        """"he" (built on the worker over its offline link), or the dealer's server-party provider for
        this link (the link id is a hash of the link's secret token: only the two parties know it)."""
        if name == "he":
            return "he"
        from cryptogen.mpc.provider_remote import RemoteDealerProvider, link_id
        return RemoteDealerProvider(self.dealer, link_id(tokens["online"], f"w{worker}"))

    def _wait_links(self, chan: TLSChannel, refs: list) -> None:
        deadline = time.monotonic() + self.options.link_timeout + 10
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            ray.get(done)
            if chan.peer_gone:
                raise ClientGone("the client disconnected while opening its links")
            if pending and time.monotonic() > deadline:
                raise ChannelError("the client did not open its data links in time")

    def _steps(self, chan: TLSChannel, sess: ServerSession) -> None:
        runner = RayRunner(self.pool, sess.wsid)
        driver = Driver(runner, self.cfg, self.plan, sess.mode)
        while True:
            msg = control.recv(chan, "forward", "end")
            if msg["type"] == "end":
                return
            step = control.Forward.from_msg(msg, self.cfg.n_positions)
            self._check_step(sess, step)
            sess.acknowledge()
            t0 = time.perf_counter()
            try:
                if step.reset:
                    runner.reset_cache()
                driver.forward(step.start, step.T, step.logits)
                runner.barrier(alive=lambda: not chan.peer_gone)  # a client gone mid-step: parked now
                # the cache after the step, kept by this process (the client's next step waits for "done")
                refs = runner.checkpoint(*sess.base()) if sess.mode == "kv-reuse" else None
                ckpt = sess.commit(step.start + step.T, refs)
            except ClientGone:
                sess.close_epoch(self.pool, runner)
                raise
            except (WorkerDied, ray.exceptions.RayError, MPCError) as e:
                if chan.peer_gone:
                    sess.close_epoch(self.pool, runner)
                    raise ClientGone("the client disconnected during a step") from None
                runner = self._recover(chan, sess, runner, e)
                driver = Driver(runner, self.cfg, self.plan, sess.mode)
                continue  # the client sends the same step again
            self.stats.kv_bytes(ckpt.kv_bytes)
            control.send(chan, "done", seconds=time.perf_counter() - t0, cached=sess.cached, kv_bytes=ckpt.kv_bytes)

    def _check_step(self, sess: ServerSession, step: control.Forward) -> None:
        if self.options.token_only and step.logits in ("last", "all"):
            raise control.ProtocolError("this server opens no logits (cryptogen serve --token-only): generate "
                                        "with --reveal token; scoring (eval) needs a server that allows logits")
        if step.reset:
            if sess.mode != "recompute" or step.start != 0:
                raise control.ProtocolError("a cache reset is only for recompute mode, from position 0")
        elif step.start != sess.cached:
            raise control.ProtocolError(f"the step starts at position {step.start} but the session's cache "
                                        f"holds {sess.cached} positions")
        need = sp.kv_cache_bytes(self.cfg, self.he_config, step.start + step.T, self.plan)
        if need > self.options.kv_budget:
            raise control.ProtocolError(
                f"the session's KV cache would need {need / 2**20:.0f} MiB at {step.start + step.T} positions, over "
                f"this server's budget of {self.options.kv_budget / 2**20:.0f} MiB per session; use a shorter context")

    def _recover(self, chan: TLSChannel, sess: ServerSession, runner: RayRunner, err: BaseException) -> RayRunner:
        """A step failed: free the epoch; if a worker was restarted, a new epoch from the last
        checkpoint and ``retry`` to the client (else the error stands)."""
        sess.close_epoch(self.pool, runner)
        restarted = sess.restarted(self.pool)  # waits for a restarting worker to come back
        if not restarted or sess.retries >= MAX_RETRIES:
            raise err
        sess.retries += 1
        links = self._reopen(sess, sess.latest())
        who = ", ".join(map(str, restarted))
        self.stats.recovered("worker")
        control.send(chan, "retry", cached=sess.cached, links=links,
                     reason=f"server worker {who} was restarted; the step is redone")
        self._wait_links(chan, self.pool.connect(sess.wsid, self._providers(sess)))
        return RayRunner(self.pool, sess.wsid)

    def _reopen(self, sess: ServerSession, ckpt) -> list[dict]:
        """A new epoch from ``ckpt``; opened again (after freeing what the attempt opened) when a
        worker's process dies while it opens."""
        for attempt in range(MAX_RETRIES + 1):
            try:
                return sess.open_epoch(self.pool, restore=ckpt)
            except ray.exceptions.RayActorError:
                sess.close_epoch(self.pool)
                if attempt == MAX_RETRIES:
                    raise


def _cause(err: BaseException) -> str:
    """A one-line, secret-free reason from a worker's error: the message of the project's own errors
    (written not to carry values), only the type name of anything else (a library's message might)."""
    cause = getattr(err, "cause", None) or err
    if not type(cause).__module__.startswith("cryptogen"):
        return f"internal error on the server ({type(cause).__name__})"
    text = str(cause).strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:300]
