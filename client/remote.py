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

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from cryptogen.net.tls import TLSError, fingerprint
from cryptogen.sampling import Sampler, SamplingConfig
from cryptogen.driver import REVEALS, Driver, StepTiming
from cryptogen.plan import make_plan
from cryptogen.telemetry import Telemetry

from .demand import DemandModel, profile_key
from .session import ClientSession

PROVIDERS = control.PROVIDERS
MODES = control.MODES


class ConnectError(ValueError):
    """The server cannot be reached or identified, or the connection details are wrong."""


@dataclass(frozen=True)
class ServerInfo:
    host: str
    port: int
    cert_pem: str
    fingerprint: str
    api_key: str

    @classmethod
    def from_file(cls, path: str | Path) -> "ServerInfo":
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConnectError(f"cannot read the connection file {path} ({e.strerror})") from None
        except ValueError:
            raise ConnectError(f"the connection file {path} is not JSON; use the file `cryptogen serve` wrote") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("address", "cert", "api_key")):
            raise ConnectError(f"the connection file {path} lacks address, cert or api_key")
        return cls.make(d["address"], d["cert"], d["api_key"], d.get("fingerprint"))

    @classmethod
    def make(cls, address: str, cert_pem: str, api_key: str, pin: str | None = None) -> "ServerInfo":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConnectError(f"server address {address!r} is not HOST:PORT")
        try:
            fp = fingerprint(cert_pem)
        except TLSError as e:
            raise ConnectError(str(e)) from None
        if pin is not None and pin != fp:
            raise ConnectError("the connection file's certificate does not match its fingerprint")
        if not api_key:
            raise ConnectError("no API key: pass --api-key or use the connection file")
        return cls(host.strip("[]"), int(port), cert_pem, fp, api_key)


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


class _ClientRunner:
    """Runs the client's half of each stage the driver names, with telemetry."""

    def __init__(self, session: ClientSession, parties: dict, telemetry: Telemetry):
        self.session, self.parties, self.telemetry = session, parties, telemetry
        self._seen: dict = {}

    def stage(self, name: str, workers: list[int], client: tuple, server: tuple) -> dict:
        parties = {w: self.parties[w] for w in workers}
        with self.telemetry.stage(name):
            getattr(self.session, name)(parties, *client)
        for w, party in parties.items():
            self._record(w, party)
        return dict.fromkeys(workers)

    def barrier(self) -> None:
        """The client's stages run synchronously: nothing is outstanding."""

    def reset_cache(self) -> None:
        """The cache is the server's."""

    def _record(self, w: int, party) -> None:
        phases = party.chan.stats.phases.values()
        now = {"sent": sum(ph.bytes_sent for ph in phases), "recv": sum(ph.bytes_recv for ph in phases),
               "rounds": sum(ph.rounds for ph in phases)}
        cr = party.cr.counters()
        off = cr.get("offline", {})  # the dealer-free provider's own link
        now["sent"] += off.get("bytes_sent", 0)
        now["recv"] += off.get("bytes_recv", 0)
        now["rounds"] += off.get("rounds", 0)
        for kind in ("triple", "bits", "matrix"):
            now[f"p_{kind}"] = cr["produced"].get(kind, 0)
            now[f"c_{kind}"] = cr["consumed"].get(kind, 0)
        last = self._seen.get(w, dict.fromkeys(now, 0))
        d = {k: now[k] - last[k] for k in now}
        self._seen[w] = now
        self.telemetry.traffic(bytes_to_server=d["sent"], bytes_to_client=d["recv"], rounds=d["rounds"])
        for kind in ("triple", "bits", "matrix"):
            self.telemetry.triples(kind, produced=d[f"p_{kind}"], consumed=d[f"c_{kind}"])


class Connection:
    """One authenticated control connection; sessions run one after another on it."""

    def __init__(self, info: ServerInfo, metrics_port: int | None = None, dealer=None, timeout: float = 30.0):
        self.info = info
        self.chan = dial(info.host, info.port, info.cert_pem, info.fingerprint, max_frame=control.MAX_CONTROL + 4096,
                         timeout=timeout, what="the CryptoGen server")
        self.chan.timeout = 3600.0  # a step may take long; the server's own idle timeout bounds the session
        control.send(self.chan, "hello", api_key=info.api_key, version=control.VERSION)
        try:
            w = control.recv(self.chan, "welcome")
        except RemoteError as e:
            self.chan.close()
            raise ConnectError(str(e)) from None
        except ChannelError as e:
            self.chan.close()
            raise ConnectError(f"the server closed the connection during the handshake ({e})") from None
        self.cfg = GPTConfig.from_hf(w["model"])
        self.he_config = HEConfig.from_dict(w["he"])
        self.plan = make_plan(self.cfg.n_layer, self.cfg.n_head, self.cfg.d_ff, int(w["workers"]),
                              int(w["layer_groups"]))
        self.model_name = str(w.get("name", ""))
        self.server_has_dealer = bool(w.get("dealer"))
        self.server_opens_logits = bool(w.get("logits", True))  # False: `serve --token-only`
        self.tokenizer = None
        if w.get("tokenizer"):
            from tokenizers import Tokenizer
            self.tokenizer = Tokenizer.from_str(w["tokenizer"])
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
        """Yields the new token ids one by one. ``prompt``: text (the server's tokenizer) or token
        ids. ``reveal`` "token" (default): the logits stay secret-shared and a 2PC argmax opens only
        the token (greedy, or temperature sampling with this process's randomness); "logits": the
        logits are opened to this process only, which samples from them (needed for top-k/top-p and
        ``keep_logits``). ``on_step(timing)`` is called after each step with its public timing."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not ids:
            raise ValueError("the prompt has no tokens")
        if len(ids) + max_new_tokens - 1 > self.cfg.n_positions:
            raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
                             f"of {self.cfg.n_positions}")
        if reveal not in REVEALS:
            raise ValueError(f"unknown reveal {reveal!r}; choose one of {', '.join(REVEALS)}")
        if reveal == "token":
            if sampling.top_k or sampling.top_p < 1:
                raise ValueError("top-k and top-p need the logits: use reveal 'logits' (--reveal logits); "
                                 "token-only output supports greedy and temperature sampling")
            if keep_logits:
                raise ValueError("keep_logits needs reveal 'logits': with token-only output no logit is opened")
        elif not self.server_opens_logits:
            raise ValueError("this server opens no logits (it runs with --token-only): use reveal 'token'")
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
        ids = [int(t) for t in token_ids]
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

    def __enter__(self):
        c = self.conn
        control.send(c.chan, "open", mode=self.mode, provider=self.provider)
        control.send_blob(c.chan, c.keys.public_context_bytes())
        try:
            msg = control.recv(c.chan, "session")
            self._open_links(msg["links"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.runner = _ClientRunner(self.session, self.parties, c.telemetry)
        self.driver = Driver(self.runner, c.cfg, c.plan, self.mode)
        c.telemetry.sessions(1)
        self._offline()
        return self

    def _offline(self) -> None:
        """Fill every link's pools with the forecast demand of the whole request (offline phase)."""
        t0 = time.perf_counter()
        self.conn.last_forecast = self.known
        if self.known:
            with ThreadPoolExecutor(max_workers=len(self.parties)) as ex:
                list(ex.map(lambda w: self.parties[w].cr.preprocess(triples=self.forecast[w]["triple"],
                                                                     bits=self.forecast[w]["bits"]), self.parties))
        self.conn.last_offline_s = time.perf_counter() - t0
        self._consumed = {w: dict(p.cr.counters()["consumed"]) for w, p in self.parties.items()}

    def _open_links(self, links: list) -> None:
        c = self.conn
        if len(links) != len(c.plan.workers):
            raise control.ProtocolError("the server named a different number of worker links")

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

    def _provider(self, tokens: dict, offline, worker: int):
        if self.provider == "he":
            from cryptogen.mpc.provider_he import HEProvider
            # a known forecast is made up front (no background look-ahead competing with the online
            # phase for the cores); without one, the pools refill in the background as they drain
            return HEProvider(self.conn.he_config, offline=offline, lookahead=0 if self.known else 2)
        from cryptogen.mpc.provider_remote import RemoteDealerProvider, link_id
        return RemoteDealerProvider(self.conn.dealer_file, link_id(tokens["online"], f"w{worker}"))

    def step(self, fwd: Forward, phase: str, on_step=None) -> StepTiming:
        c = self.conn
        t0 = time.perf_counter()
        control.send(c.chan, "forward", **fwd.to_msg())
        try:
            self.driver.forward(fwd.start, fwd.T, fwd.logits)
        except (ChannelError, control.ProtocolError, ValueError) as e:
            reason = self._server_reason(e)
            c.broken = str(reason)[:200]
            raise reason from None
        control.recv(c.chan, "done")
        timing = StepTiming(fwd.start + fwd.T - 1, phase, time.perf_counter() - t0)
        for w, party in self.parties.items():  # calibrate the demand forecast (public counts)
            now = dict(party.cr.counters()["consumed"])
            last = self._consumed.get(w, {})
            self.demand.observe(w, fwd.start, fwd.T, fwd.logits, {k: now.get(k, 0) - last.get(k, 0) for k in now})
            self._consumed[w] = now
            mark = getattr(party.cr, "mark", None)
            if mark is not None:
                mark()
        c.telemetry.token(phase, self.mode, timing.seconds)
        if on_step:
            on_step(timing)
        return timing

    def _server_reason(self, err: Exception) -> Exception:
        """After a link failed: the server's own error message if it sent one, else ours."""
        chan = self.conn.chan
        old, chan.timeout = chan.timeout, 10.0
        try:
            control.recv(chan, "done")
        except RemoteError as e:
            return e
        except Exception:  # noqa: BLE001 - fall back to the local error
            pass
        finally:
            chan.timeout = old
        return RemoteError("session", f"the secure session failed: {err}")

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
