"""``cryptogen serve``: the model owner's long-lived secure server on a Ray cluster.

Start-up, in order: check the model folder and the listen address (one-line errors, before Ray);
join or start Ray; load the TLS certificate (or make a self-signed one in the state folder) and
the API key (made on first start, kept in the state folder, mode 0600); start the worker actors
(each loads and encodes its weights once); listen; write the connection file (address,
certificate, fingerprint, API key: give it to the users, privately); serve until SIGINT/SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptogen.cli_common import (check_can_listen, check_file, check_float, check_int, check_output_file, check_port,
                                  check_ray_address, check_writable_dir, split_host_port)
from cryptogen.net.tls import ensure_certificate, fingerprint, new_secret

from .gateway import Gateway, GatewayConfig


class ServeError(ValueError):
    """Bad ``cryptogen serve`` input, found before anything starts."""


@dataclass(frozen=True)
class ServeOptions:
    model: str = "wikitext2"
    workers: int = 1
    layer_groups: int = 1
    address: str | None = None
    listen: str = "127.0.0.1:0"
    connection_file: str = "cryptogen-server.json"
    max_sessions: int = 4
    idle_timeout: float = 600.0
    state_dir: str | None = None
    cert: str | None = None
    key: str | None = None
    metrics_port: int | None = None
    dealer: str | None = None
    num_cpus: int | None = None  # embedded Ray only
    token_only: bool = False  # clients learn generated tokens only, never logits
    resume_grace: float = 20.0  # seconds a dropped client may resume its session (0: never)
    kv_budget_mb: float = 4096.0  # encrypted KV cache one session may hold, all workers (MiB)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cryptogen" / "server"


def parse_listen(listen: str) -> tuple[str, int]:
    return split_host_port("--listen", listen, "127.0.0.1:7860, or 0.0.0.0:7860 for every address (port 0: any "
                           "free port)", err=ServeError)


def _api_key(state: Path) -> str:
    path = state / "api_key"
    if path.is_file():
        key = path.read_text().strip()
        if len(key) == 64:
            return key
    key = new_secret()
    state.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key


def _write_private(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def check(opts: ServeOptions) -> tuple[Path, str, int]:
    """Everything that can be checked before Ray starts: (model folder, host, port). Every option
    gives a one-line ServeError (a ValueError) naming its flag."""
    from cryptogen import registry
    from cryptogen.model import GPT

    host, port = parse_listen(opts.listen)
    for flag, v in (("--workers", opts.workers), ("--max-sessions", opts.max_sessions),
                    ("--layer-groups", opts.layer_groups)):
        check_int(flag, v, 1, err=ServeError)
    check_float("--idle-timeout", opts.idle_timeout, 0.0, lo_open=True, note="seconds", err=ServeError)
    check_float("--resume-grace", opts.resume_grace, 0.0, 86400.0, note="seconds; 0: a dropped client cannot resume",
                err=ServeError)
    check_float("--kv-budget-mb", opts.kv_budget_mb, 0.0, lo_open=True, note="MiB per session", err=ServeError)
    if opts.num_cpus is not None:
        check_int("--num-cpus", opts.num_cpus, 1, err=ServeError)
    if opts.metrics_port is not None:
        check_port("--metrics-port", opts.metrics_port, err=ServeError)
    if opts.address is not None:
        check_ray_address("--address", opts.address, err=ServeError)
    if not isinstance(opts.token_only, bool):
        raise ServeError(f"token_only {opts.token_only!r} is not allowed; use True or False")
    if not isinstance(opts.model, str) or not opts.model:
        raise ServeError(f"--model {opts.model!r} is not allowed; use a shipped model name or a checkpoint folder")
    folder = registry.resolve_model(opts.model).resolve()
    for f in ("config.json", "model.safetensors"):
        if not (folder / f).is_file():
            raise ServeError(f"model folder {folder} has no {f}; pass a folder with config.json and "
                             "model.safetensors (and tokenizer.json)")
    cfg = GPT.read_config(folder)
    from cryptogen.plan import make_plan
    make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, opts.workers, opts.layer_groups)  # PlanError early
    conn = Path(opts.connection_file)
    if not conn.parent.resolve().is_dir():
        raise ServeError(f"the folder of --connection-file {conn} does not exist; create it or pass another path")
    check_output_file("--connection-file", conn, err=ServeError)
    if bool(opts.cert) != bool(opts.key):
        raise ServeError("give both --cert and --key, or neither (a self-signed pair is then kept in the state folder)")
    if opts.cert:
        check_file("--cert", opts.cert, "the TLS certificate (PEM)", err=ServeError)
        check_file("--key", opts.key, "its private key (PEM)", err=ServeError)
    state = Path(opts.state_dir) if opts.state_dir else default_state_dir()
    made = [state / "api_key"] + ([] if opts.cert else [state / "server.crt", state / "server.key"])
    if not all(f.is_file() for f in made):  # something is written there at start
        check_writable_dir("--state-dir", state, err=ServeError)
    if opts.dealer is not None:
        check_file("--dealer", opts.dealer, "the dealer's server connection file (dealer-server.json)", err=ServeError)
    check_can_listen("--listen", host, port, err=ServeError)  # a taken port or a foreign address, before Ray
    if opts.metrics_port:
        check_can_listen("--metrics-port", "127.0.0.1", opts.metrics_port, err=ServeError)
    return folder, host, port


def start(opts: ServeOptions):
    """Start everything; returns (gateway, pool, exporter, connection dict). The caller serves."""
    from cryptogen.cluster.connect import connect
    from cryptogen.he.params import HEConfig
    from cryptogen.model import GPT
    from cryptogen.net import control
    from cryptogen.plan import make_plan
    from cryptogen.scheduler.ray_runner import ServerPool

    folder, host, port = check(opts)
    cfg = GPT.read_config(folder)
    tok = folder / "tokenizer.json"
    tokenizer_json = tok.read_text() if tok.is_file() else None
    state = Path(opts.state_dir) if opts.state_dir else default_state_dir()
    hosts = ["localhost", "127.0.0.1"] + ([host] if host not in ("", "0.0.0.0", "::") else [])
    try:
        tls = ensure_certificate(state, opts.cert, opts.key, hosts)
        api_key = _api_key(state)
    except OSError as e:  # the state folder could not be written after all (check() tried it)
        raise ServeError(f"cannot write the certificate or API key in {state} ({e.strerror or e}); "
                         "pass a writable --state-dir") from None
    dealer = None
    if opts.dealer:
        from cryptogen.mpc.errors import ProviderError
        from cryptogen.mpc.provider_remote import load_connection
        try:
            dealer = load_connection(opts.dealer)
        except ProviderError as e:
            raise ServeError(str(e)) from None
        if dealer.get("role") != "server":
            raise ServeError(f"--dealer {opts.dealer} is the dealer's {dealer.get('role')} file; the server needs "
                             "dealer-server.json")
    _log(f"starting Ray ({opts.address or 'embedded'})")
    info = connect(opts.address, num_cpus=opts.num_cpus)
    he_config = HEConfig()
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, opts.workers, opts.layer_groups)
    t0 = time.perf_counter()
    _log(f"starting {opts.workers} worker(s) on {info.nodes} node(s): loading and encoding the weights")
    pool = ServerPool(str(folder), plan, he_config, tls, host, control.link_cap(cfg, he_config))
    _log(f"workers ready in {time.perf_counter() - t0:.0f} s")
    gw = Gateway(pool, cfg, plan, opts.layer_groups, he_config, tokenizer_json, api_key, tls,
                 GatewayConfig(max_sessions=opts.max_sessions, idle_timeout=opts.idle_timeout,
                               resume_grace=float(opts.resume_grace), kv_budget=int(opts.kv_budget_mb * 2**20),
                               token_only=opts.token_only), dealer,
                 model_name=folder.name)
    bound_host, bound_port = gw.listen(host, port)
    exporter = None
    if opts.metrics_port is not None:
        from cryptogen.exporter import MetricsExporter
        from cryptogen.telemetry import Telemetry

        from .stats import GatewayCollector
        telemetry = Telemetry("server")

        def snapshot():
            for snap in pool.snapshots():
                telemetry.merge(snap)
            telemetry.sessions(gw.stats.as_dict()["open"])  # the gateway's count, not one per worker
            return telemetry.snapshot()
        exporter = MetricsExporter(snapshot, port=opts.metrics_port)
        exporter.registry.register(GatewayCollector(gw.stats))
        exporter.start()
        _log(f"metrics at http://127.0.0.1:{exporter.port}/metrics")  # before the connection file appears
    advertised = bound_host
    if bound_host in ("0.0.0.0", "::", ""):
        import ray
        advertised = ray.util.get_node_ip_address()
    conn = {"address": f"{advertised}:{bound_port}", "cert": tls[0], "fingerprint": fingerprint(tls[0]),
            "api_key": api_key, "model": folder.name}
    _write_private(Path(opts.connection_file), conn)
    return gw, pool, exporter, conn


def serve(opts: ServeOptions) -> None:
    gw, pool, exporter, conn = start(opts)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _log(f"serving {conn['model']} at {conn['address']} (TLS {conn['fingerprint'][:23]}...); "
         f"connection file {opts.connection_file}")
    stop.wait()
    _log("stopping: open sessions get an error")
    gw.close()
    if exporter is not None:
        exporter.stop()
    pool.shutdown()
    from cryptogen.cluster.connect import shutdown
    shutdown()
