"""The client, on the user's machine: connects to a ``cryptogen serve`` over TLS and runs the
client's half of every protocol locally. No Ray: this module and everything it imports work with
``sys.modules['ray'] = None``.

It holds the secret key (made here, never sent: only the public context leaves), the prompt's
token ids, every client share, the logits and the sampled tokens. The server sees ciphertexts,
uniformly masked openings and the public counts it needs to schedule (positions, steps).

    conn = connect("server.json")                     # or connect(server=..., server_cert=..., api_key=...)
    for token in conn.generate("The history of the", max_new_tokens=8):
        ...
    logits = conn.score(token_ids)                    # secure logits at every position (eval)

Each call opens a session (its own per-worker TLS data links, tokens from the control connection)
and runs the same stage sequence as the server (``cryptogen.driver.Driver.forward``, shared code).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cryptogen import secure_plan as sp
from cryptogen.he.keys import ClientKeys
from cryptogen.he.params import HEConfig
from cryptogen.model import GPTConfig
from cryptogen.mpc.errors import ChannelError
from cryptogen.mpc.party import Party
from cryptogen.net import control
from cryptogen.net.channel import dial, frame
from cryptogen.net.control import Forward, RemoteError
from cryptogen.sampling import Sampler, SamplingConfig
from cryptogen.driver import REVEALS, Driver, StepTiming
from cryptogen.plan import make_plan
from cryptogen.telemetry import Telemetry

from .demand import DemandModel, profile_key
from .info import ConnectError, Recovery, ServerInfo
from .runner import ClientRunner
from .session import ClientSession

PROVIDERS = control.PROVIDERS
MODES = control.MODES


MAX_RECOVERIES = 3  # a step redone at most this often (server worker restarts, dropped connections)
RECOVERY_WAIT = 300.0  # how long the server may take to restart a worker before it answers a failed step
RESUME_WAIT = 10.0  # how long a dropped connection is retried before the session is given up


def connect(file: str | Path | None = None, *, server: str | None = None, server_cert: str | Path | None = None,
            api_key: str | None = None, metrics_port: int | None = None, dealer: str | Path | None = None,
            timeout: float = 30.0) -> "Connection":
    """A connection to a ``cryptogen serve``: by its connection file, or by address, certificate
    (PEM file) and API key."""
    if file is not None:
        info = ServerInfo.from_file(file)
    else:
        if not (server and server_cert and api_key):
            raise ConnectError("give a connection file (--connect FILE), or --server, --server-cert and --api-key")
        try:
            pem = Path(server_cert).read_text()
        except OSError as e:
            raise ConnectError(f"cannot read the server certificate {server_cert} ({e.strerror})") from None
        info = ServerInfo.make(server, pem, api_key)
    return Connection(info, metrics_port=metrics_port, dealer=dealer, timeout=timeout)


class Connection:
    """One authenticated control connection; sessions run one after another on it."""

    def __init__(self, info: ServerInfo, metrics_port: int | None = None, dealer=None, timeout: float = 30.0):
        self.info, self.timeout = info, timeout
        w = self._dial()
        try:
            self._welcome(w)
        except ConnectError:
            self.chan.close()
            raise
        self.dealer_file = dealer
        self.link_cap = control.link_cap(self.cfg, self.he_config)
        self.telemetry = Telemetry("client")
        self.exporter = None
        if metrics_port is not None:
            from cryptogen.exporter import MetricsExporter
            self.exporter = MetricsExporter(self.telemetry, port=metrics_port).start()
        self._keys: ClientKeys | None = None
        self.demand = {r: DemandModel(profile_key(self.cfg, len(self.plan.workers), int(w["layer_groups"]),
                                                  self.he_config, r)) for r in REVEALS}
        self.last_offline_s = 0.0  # correlated randomness made before the last request's first step
        self.last_forecast = False  # whether that request's demand was known (else made on demand, online)
        self.broken: str | None = None  # set when a session failed mid-step: the control stream may be out of step
        self.kv_bytes = 0  # the server's encrypted KV cache for the last step (all workers; public)
        self.recoveries: list[Recovery] = []  # steps redone after a server worker restart or a dropped connection

    def _welcome(self, w: dict) -> None:
        """The server's public facts, each checked: a malformed welcome is a ConnectError naming the field."""
        field = "model"
        try:
            self.cfg = GPTConfig.from_hf(w["model"])
            field = "he"
            self.he_config = HEConfig.from_dict(w["he"])
            field = "workers"
            workers, groups = w["workers"], w["layer_groups"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in (workers, groups)):
                raise ValueError(field)
            self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, workers, groups)
            field = "tokenizer"
            self.tokenizer = None
            if w.get("tokenizer") is not None:
                from tokenizers import Tokenizer
                if not isinstance(w["tokenizer"], str):
                    raise ValueError(field)
                self.tokenizer = Tokenizer.from_str(w["tokenizer"])
        except Exception as e:  # noqa: BLE001 - anything the peer's fields make a library raise
            raise ConnectError(f"the server sent a malformed welcome ({field}: {type(e).__name__}); "
                               "check that the server and this client are the same version") from None
        self.model_name = str(w.get("name", ""))[:200]
        self.server_has_dealer = w.get("dealer") is True
        self.server_opens_logits = w.get("logits", True) is not False  # False: `serve --token-only`

    def _dial(self) -> dict:
        """(Re)open the control connection: TLS with the pinned certificate, the API key; the welcome."""
        info = self.info
        self.chan = dial(info.host, info.port, info.cert_pem, info.fingerprint, max_frame=control.MAX_CONTROL + 4096,
                         timeout=self.timeout, what="the CryptoGen server")
        self.chan.timeout = 3600.0  # a step may take long; the server's own idle timeout bounds the session
        control.send(self.chan, "hello", api_key=info.api_key, version=control.VERSION)
        try:
            return control.recv(self.chan, "welcome")
        except RemoteError as e:
            self.chan.close()
            raise ConnectError(str(e)) from None
        except ChannelError as e:
            self.chan.close()
            raise ConnectError(f"the server closed the connection during the handshake ({e})") from None

    @property
    def keys(self) -> ClientKeys:
        """The secret key set, made here on first use (kept for this connection's sessions)."""
        if self._keys is None:
            self._keys = ClientKeys.generate(self.he_config, sp.rotation_steps(self.cfg, self.plan, self.he_config.n))
        return self._keys

    def close(self) -> None:
        try:
            control.send(self.chan, "close")
        except ChannelError:
            pass
        self.chan.close()
        if self.exporter is not None:
            self.exporter.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the user's calls ---------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ConnectError("the server sent no tokenizer: pass token ids instead of text")
        return self.tokenizer.encode(prompt).ids

    def generate(self, prompt, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 mode: str = "kv-reuse", provider: str = "he", on_step=None, keep_logits: bool = False,
                 reveal: str = "token"):
        """An iterator of the new token ids, one by one (every argument is checked here, before any
        session). ``prompt``: text (the server's tokenizer) or token ids. ``reveal`` "token"
        (default): the logits stay secret-shared and a 2PC argmax opens only the token (greedy, or
        temperature sampling with this process's randomness); "logits": the logits are opened to
        this process only, which samples from them (needed for top-k/top-p and ``keep_logits``).
        ``on_step(timing)`` is called after each step with its public timing."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingConfig):
            raise ValueError("sampling must be a SamplingConfig")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if reveal not in REVEALS:
            raise ValueError(f"unknown reveal {reveal!r}; choose one of {', '.join(REVEALS)}")
        ids = self.encode(prompt) if isinstance(prompt, str) else self._ids(prompt)
        if not ids:
            raise ValueError("the prompt has no tokens")
        if len(ids) + max_new_tokens - 1 > self.cfg.n_positions:
            raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
                             f"of {self.cfg.n_positions}")
        if reveal == "token":
            if sampling.top_k or sampling.top_p < 1:
                raise ValueError("top-k and top-p need the logits: use reveal 'logits' (--reveal logits); "
                                 "token-only output supports greedy and temperature sampling")
            if keep_logits:
                raise ValueError("keep_logits needs reveal 'logits': with token-only output no logit is opened")
        elif not self.server_opens_logits:
            raise ValueError("this server opens no logits (it runs with --token-only): use reveal 'token'")
        return self._generate(ids, max_new_tokens, sampling, mode, provider, on_step, keep_logits, reveal)

    def _ids(self, token_ids) -> list[int]:
        """Token ids, each an integer in the vocabulary (ValueError otherwise)."""
        try:
            ids = list(token_ids)
        except TypeError:
            raise ValueError("the prompt must be text or a list of token ids") from None
        V = self.cfg.vocab_size
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise ValueError(f"token ids must be integers in the vocabulary [0, {V})")
        return [int(t) for t in ids]

    def _generate(self, ids, max_new_tokens, sampling, mode, provider, on_step, keep_logits, reveal):
        out = "token" if reveal == "token" else "last"
        n = len(ids)
        steps = [Forward(0, n, out)] + [
            Forward(n + i - 1, 1, out) if mode == "kv-reuse" else Forward(0, n + i, out, reset=True)
            for i in range(1, max_new_tokens)]
        with self._session(ids, sampling, mode, provider, steps) as s:
            s.step(steps[0], "prefill", on_step)
            yield s.session.tokens[n]
            for i in range(1, max_new_tokens):
                s.step(steps[i], "decode", on_step)
                yield s.session.tokens[n + i]
            self.last_logits = list(s.session.logit_history) if keep_logits else []

    def score(self, token_ids, provider: str = "he", on_step=None) -> np.ndarray:
        """Secure logits (this process only) at every position of a given text: (T, vocab)."""
        ids = self._ids(token_ids)
        if not self.server_opens_logits:
            raise ValueError("this server opens no logits (it runs with --token-only), so it cannot score text")
        if not 1 <= len(ids) <= self.cfg.n_positions:
            raise ValueError(f"the text must have 1..{self.cfg.n_positions} tokens, got {len(ids)}")
        with self._session(ids, SamplingConfig(), "kv-reuse", provider, [Forward(0, len(ids), "all")]) as s:
            s.step(Forward(0, len(ids), "all"), "prefill", on_step)
            return np.stack(s.session.logit_history)

    def _session(self, ids, sampling, mode, provider, steps=()) -> "_Session":
        if self.broken:
            raise ConnectError(f"this connection cannot be reused after a failed session ({self.broken}); connect again")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if provider == "dealer" and self.dealer_file is None:
            raise ValueError("the dealer provider needs the dealer's client connection file (--dealer FILE)")
        return _Session(self, ids, sampling, mode, provider, list(steps))


class _Session:
    """One secure session: its data links, parties and the client's shares."""

    def __init__(self, conn: Connection, ids, sampling, mode, provider, steps=()):
        self.conn, self.mode, self.provider = conn, mode, provider
        # with the dealer-free provider: the request's randomness, made before its first step
        self.demand = conn.demand["token" if any(f.logits == "token" for f in steps) else "logits"]
        self.forecast = ({w: self.demand.predict(w, [(f.start, f.T, f.logits) for f in steps])
                          for w in range(len(conn.plan.workers))} if provider == "he" and steps else {})
        self.known = bool(self.forecast) and all(v is not None for v in self.forecast.values())
        self._consumed: dict[int, dict] = {}
        self.session = ClientSession(conn.cfg, conn.plan, conn.keys, ids, Sampler(sampling))
        self.parties: dict[int, Party] = {}
        self.links: list = []
        self.steps, self.done_steps = list(steps), 0
        self.sid = self.secret = None
        self.cached = 0  # cache positions of the last step the server confirmed (``done``)

    def __enter__(self):
        c = self.conn
        control.send(c.chan, "open", mode=self.mode, provider=self.provider)
        control.send_blob(c.chan, c.keys.public_context_bytes())
        try:
            msg = control.recv(c.chan, "session")
            self.sid, self.secret = msg.get("sid"), msg.get("resume")
            if not (isinstance(self.sid, str) and isinstance(self.secret, str) and 0 < len(self.sid) <= 64
                    and 0 < len(self.secret) <= 256):
                raise control.ProtocolError("the server sent a malformed session; check that the server and this "
                                            "client are the same version")
            self._open_links(msg.get("links"))
            self.runner = ClientRunner(self.session, self.parties, c.telemetry)
            self.driver = Driver(self.runner, c.cfg, c.plan, self.mode)
            c.telemetry.sessions(1)
            self._offline()
        except ChannelError as e:  # a link closed while opening: the server says why (one line)
            self.__exit__(None, None, None)
            raise self._reason(e) from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _reason(self, err: Exception) -> RemoteError:
        """After a link failed outside a step: the server's own error if it sent one, else ours."""
        self.conn.broken = str(err)[:200]
        chan = self.conn.chan
        old, chan.timeout = chan.timeout, 5.0
        try:
            control.recv(chan, "done")
        except RemoteError as e:
            return e
        except Exception:  # noqa: BLE001 - no reason from the server: report the local one
            pass
        finally:
            chan.timeout = old
        return RemoteError("session", f"the secure session failed: {err}")

    def _offline(self) -> None:
        """Fill every link's pools with the forecast demand of the whole request (offline phase)."""
        t0 = time.perf_counter()
        if self.forecast and self.done_steps:  # after a recovery: the steps still to run
            rest = [(f.start, f.T, f.logits) for f in self.steps[self.done_steps:]]
            self.forecast = {w: self.demand.predict(w, rest) for w in self.parties}
            self.known = all(v is not None for v in self.forecast.values())
        self.conn.last_forecast = self.known
        if self.known:
            with ThreadPoolExecutor(max_workers=len(self.parties)) as ex:
                list(ex.map(lambda w: self.parties[w].cr.preprocess(triples=self.forecast[w]["triple"],
                                                                     bits=self.forecast[w]["bits"]), self.parties))
        self.conn.last_offline_s = time.perf_counter() - t0
        self._consumed = {w: dict(p.cr.counters()["consumed"]) for w, p in self.parties.items()}

    def _open_links(self, links) -> None:
        c = self.conn
        self._check_links(links)

        def one(link):
            t = link["tokens"]
            chans = {}
            for name in ("online", "offline"):
                if name in t:
                    ch = dial(str(link["host"]), int(link["port"]), c.info.cert_pem, c.info.fingerprint,
                              max_frame=c.link_cap, what=f"server worker {int(link['worker'])}")
                    self.links.append(ch)
                    ch.send_bytes(frame(np.frombuffer(str(t[name]).encode(), np.uint8)))
                    chans[name] = ch
            party = Party("client", chans["online"], self._provider(t, chans.get("offline"), int(link["worker"])),
                          c.he_config.fixed_point)
            party.handshake()
            return int(link["worker"]), party
        with ThreadPoolExecutor(max_workers=len(links)) as ex:
            for w, party in ex.map(one, links):
                self.parties[w] = party

    def _check_links(self, links) -> None:
        """Each worker once: an int index, a host, a port, the link tokens this provider needs."""
        n, names = len(self.conn.plan.workers), ("online", "offline") if self.provider == "he" else ("online",)

        def ok(link) -> bool:
            t = link.get("tokens") if isinstance(link, dict) else None
            return (isinstance(t, dict) and isinstance(link.get("worker"), int) and isinstance(link.get("host"), str)
                    and 0 < len(link["host"]) < 256 and isinstance(link.get("port"), int)
                    and not isinstance(link["port"], bool) and 0 < link["port"] < 65536
                    and all(isinstance(t.get(k), str) and 0 < len(t[k]) < 256 for k in names))
        if not isinstance(links, list) or len(links) != n or not all(ok(x) for x in links) \
                or sorted(x["worker"] for x in links) != list(range(n)):
            raise control.ProtocolError("the server sent malformed worker links; check that the server and this "
                                        "client are the same version")

    def _provider(self, tokens: dict, offline, worker: int):
        if self.provider == "he":
            from cryptogen.mpc.provider_he import HEProvider
            # a known forecast is made up front (no background look-ahead competing with the online
            # phase for the cores); without one, the pools refill in the background as they drain
            return HEProvider(self.conn.he_config, offline=offline, lookahead=0 if self.known else 2)
        from cryptogen.mpc.provider_remote import RemoteDealerProvider, link_id
        return RemoteDealerProvider(self.conn.dealer_file, link_id(tokens["online"], f"w{worker}"))

    def step(self, fwd: Forward, phase: str, on_step=None) -> StepTiming:
        """One step; after a server worker restart or a dropped connection, the step is redone from
        the last confirmed position (``retry``), at most ``MAX_RECOVERIES`` times."""
        c = self.conn
        try:
            waited = self.runner.settle()  # a dealer's items for this step, asked after the last one
        except (ChannelError, ValueError):  # the dealer's link failed (its party may have gone): the
            waited = 0.0  # step's first take raises it again, and the attempt asks the server why
        t0 = time.perf_counter()
        mark = self._mark()
        for _ in range(MAX_RECOVERIES + 1):
            msg = self._attempt(fwd)
            if msg["type"] == "done":
                break
            r0 = time.perf_counter()
            self._rollback(mark)
            try:
                self._relink(msg)
            except ChannelError as e:
                raise self._reason(e) from None
            c.recoveries.append(Recovery(str(msg.get("reason", ""))[:200], fwd.start + fwd.T - 1,
                                         time.perf_counter() - r0))
        else:
            c.broken = "too many recoveries"
            raise RemoteError("session", f"the step at position {fwd.start + fwd.T - 1} failed {MAX_RECOVERIES + 1} "
                                         "times on the server; try again later")
        self.cached, self.done_steps = fwd.start + fwd.T, self.done_steps + 1
        c.kv_bytes = int(msg.get("kv_bytes", 0)) if isinstance(msg.get("kv_bytes", 0), int) else 0
        timing = StepTiming(fwd.start + fwd.T - 1, phase, time.perf_counter() - t0, waited)
        for w, party in self.parties.items():  # calibrate the dealer-free provider's forecast (public counts)
            now, last = dict(party.cr.counters()["consumed"]), self._consumed.get(w, {})
            if self.provider == "he":  # a dealer's truncations take their own kind: other counts
                self.demand.observe(w, fwd.start, fwd.T, fwd.logits, {k: now.get(k, 0) - last.get(k, 0) for k in now})
            self._consumed[w] = now
            mark = getattr(party.cr, "mark", None)
            if mark is not None:
                mark()
        c.telemetry.token(phase, self.mode, timing.seconds)
        if on_step:
            on_step(timing)
        return timing

    def _attempt(self, fwd: Forward) -> dict:
        """Run the client's half of a step: the server's ``done``, or its ``retry`` after a fault."""
        c = self.conn
        try:
            control.send(c.chan, "forward", **fwd.to_msg())
            self.driver.forward(fwd.start, fwd.T, fwd.logits)
        except (ChannelError, control.ProtocolError, ValueError) as e:
            self._abort_links()  # the server's halves blocked on this client fail at once
            return self._verdict(e)
        try:
            return control.recv(c.chan, "done", "retry")
        except ChannelError as e:
            return self._resume(e)

    def _verdict(self, err: Exception) -> dict:
        """After a failed step: the server's ``retry`` (a worker was restarted), or its error."""
        chan = self.conn.chan  # a message the server sent before it went (shutdown, retry) is read first
        old, chan.timeout = chan.timeout, RECOVERY_WAIT
        try:
            return control.recv(chan, "retry")
        except RemoteError as e:
            self.conn.broken = str(e)[:200]
            raise
        except ChannelError as e:  # the control connection itself is gone
            return self._resume(e)
        except control.ProtocolError:
            self.conn.broken = str(err)[:200]
            raise RemoteError("session", f"the secure session failed: {err}") from None
        finally:
            chan.timeout = old

    def _resume(self, err: Exception) -> dict:
        """The control connection dropped: a new one continues the session (its id and resume
        secret) at the last confirmed position, for up to ``RESUME_WAIT`` seconds."""
        c = self.conn
        c.chan.abort()
        self._abort_links()
        deadline, last = time.monotonic() + RESUME_WAIT, err
        while time.monotonic() < deadline:
            try:
                c._dial()
                control.send(c.chan, "resume", sid=self.sid, secret=self.secret, cached=self.cached)
                return control.recv(c.chan, "retry")
            except (ConnectError, ChannelError, RemoteError, control.ProtocolError) as e:
                last = e
                c.chan.abort()
                time.sleep(0.5)
        c.broken = "the connection to the server was lost"
        raise ConnectError(f"the connection to the server was lost and the session could not be resumed ({last}); "
                           "connect again when the server is back") from None

    def _mark(self) -> tuple:
        s = self.session
        return len(s.tokens), len(s.logit_history), s.sampler.rng.bit_generator.state

    def _rollback(self, mark: tuple) -> None:
        """The client's state as it was before the step (tokens, logits, the sampler's randomness)."""
        s = self.session
        del s.tokens[mark[0]:]
        del s.logit_history[mark[1]:]
        s.sampler.rng.bit_generator.state = mark[2]

    def _abort_links(self) -> None:
        for ch in self.links:
            ch.abort()

    def _relink(self, msg: dict) -> None:
        """A new epoch: the old links and pools go, the new links are dialled, pools refilled."""
        self._abort_links()
        for party in self.parties.values():
            closer = getattr(party.cr, "close", None)
            if closer is not None:
                closer()
        self.parties.clear()
        self.links.clear()
        self.runner._seen.clear()
        if msg.get("cached") != self.cached:  # the server continues from what this client last confirmed
            raise control.ProtocolError(f"the server continued the session at position {str(msg.get('cached'))[:20]}, "
                                        f"not at {self.cached}")
        self._open_links(msg.get("links"))
        self._offline()

    def __exit__(self, *exc):
        try:
            if not self.conn.chan.peer_gone:
                control.send(self.conn.chan, "end")
        except ChannelError:
            pass
        for party in self.parties.values():
            closer = getattr(party.cr, "close", None)
            if closer is not None:
                closer()
        if self.provider == "he":
            self.demand.save()
        for ch in self.links:
            ch.close()
        self.session.close()
        self.conn.telemetry.sessions(0)
        return False
