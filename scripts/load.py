"""Load: N concurrent secure sessions against one ``cryptogen serve``, per-session latency and the
server's total throughput (issue #13).

    .venv/bin/python scripts/load.py [--sessions 8] [--tokens 2] [--provider dealer|he]
        [--model PATH | --connect server.json [--dealer dealer-client.json]] [--out docs/bench/load.json]

Without ``--connect`` it starts its own server: a ``cryptogen serve`` in its own OS process (its own
embedded Ray, ``--workers`` worker actors, ``--max-sessions`` = ``--sessions``) over ``--model`` (default:
the tests' tiny random GPT-2, tests/tiny.py), and, for ``--provider dealer``, a dealer in this process.
Every session is its own Ray-free client (``cryptogen.client.remote.connect``: its own keys, TLS
control connection and data links) in a thread of this process; all start together. With a model
folder at hand (embedded, or ``--model`` with ``--connect``) each session's tokens are compared with
plaintext greedy decoding of the same checkpoint.

``--check-busy`` (default when the embedded server's ``--max-sessions`` equals ``--sessions``): once
every session has its first token (all open), one more client must be refused with "busy, retry
after N s" (``RemoteError`` code ``busy``, ``retry_after``); then the sessions finish.

Per session: connect (TLS + hello), time to first token (keys, 80 MB public context, links, prefill),
decode step times, total latency. Total: wall time, tokens/s of the server, and (embedded) CPU seconds
of this process (clients + dealer), the serve process (gateway) and its worker actors, from /proc.
The 1-minute load average before and after is recorded too (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [[3, 17], [9, 100, 4], [42, 7, 19], [1, 2, 3], [5, 6], [200, 13, 8], [77, 31], [11, 250, 60]]


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    """The tests' prompts (tiny-model greedy margins checked), then seeded random ones."""
    import random
    rng = random.Random(0)
    out = [[t % vocab for t in p] for p in PROMPTS[:n]]
    while len(out) < n:
        out.append([rng.randrange(vocab) for _ in range(rng.randint(2, 4))])
    return out


# ---- an embedded server (shared with scripts/soak.py) -------------------------------------------
class Embedded:
    """A ``cryptogen serve`` in its own process (``client.local_server.LocalServer``) with its metrics
    endpoint, and a dealer in this process when the provider is ``dealer``."""

    def __init__(self, model: str | None, workers: int, max_sessions: int, provider: str,
                 idle_timeout: float = 600.0, env: dict | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="cryptogen-load-")
        tmp = Path(self._tmp.name)
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import save_tiny
            self.folder = save_tiny(tmp / "tiny")
            self.model_name = "tiny (tests/tiny.py: vocab 256, 64 positions, d=64, 2 layers, 2 heads)"
        else:
            from cryptogen.registry import resolve_model
            self.folder = resolve_model(model).resolve()
            self.model_name = str(model)
        self.dealer = None
        extra = ["--metrics-port", "0", "--idle-timeout", str(idle_timeout)]
        if provider == "dealer":
            from cryptogen.dealer.service import DealerServer
            self.dealer = DealerServer(listen="127.0.0.1:0", state_dir=str(tmp / "dealer"), out_dir=str(tmp)).start()
            extra += ["--dealer", str(self.dealer.server_file)]
        from cryptogen.client.local_server import LocalServer
        t0 = time.monotonic()
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})  # the serve process and, through its Ray, its workers inherit it
        try:
            self.server = LocalServer(str(self.folder), workers=workers, max_sessions=max_sessions,
                                      extra=extra).start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.start_s = time.monotonic() - t0
        self.conn_file = self.server.connection_file
        self.dealer_client = self.dealer.client_file if self.dealer is not None else None
        self.pid = self.server.proc.pid

    def metrics(self) -> dict:
        return read_metrics(self.server.metrics_url)

    def wait_idle(self, timeout: float = 60.0) -> dict:
        """The server's metrics once no session is open and no worker holds a KV cache."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            kv = sum(v for k, v in m.items() if k.startswith("cryptogen_kv_cache_bytes"))
            if (m.get("cryptogen_server_sessions_open") == 0 and kv == 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.5)

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            if self.dealer is not None:
                self.dealer.stop()
            self._tmp.cleanup()


def read_metrics(url: str) -> dict:
    """The server's metric lines: name{labels} -> value."""
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def greedy_reference(folder: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch

    from cryptogen.model import GPT
    model = GPT.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                logits, _ = model(torch.tensor([ids]))
                ids.append(int(logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---- the sessions -----------------------------------------------------------------------------
def run_sessions(conn_file, dealer_client, prompts, tokens: int, provider: str, check_busy: bool) -> dict:
    from cryptogen.client.remote import connect
    from cryptogen.net.control import RemoteError

    n = len(prompts)
    start = threading.Barrier(n + 1, timeout=600)  # all sessions start together
    all_open = threading.Barrier(n + 1, timeout=1800) if check_busy else None
    go_on = threading.Event()
    rows: dict[int, dict] = {}
    errors: list = []

    def one(i: int) -> None:
        row = {"session": i, "prompt_len": len(prompts[i]), "tokens": [], "decode_s": []}
        try:
            start.wait()
            t0 = time.monotonic()
            with connect(conn_file, dealer=dealer_client) as c:
                row["connect_s"] = time.monotonic() - t0

                def on_step(timing):
                    (row.setdefault("prefill_s", timing.seconds) if timing.phase == "prefill"
                     else row["decode_s"].append(timing.seconds))
                gen = c.generate(prompts[i], tokens, provider=provider, on_step=on_step)
                row["tokens"].append(next(gen))
                row["first_token_s"] = time.monotonic() - t0
                if all_open is not None:
                    all_open.wait()
                    go_on.wait()
                row["tokens"] += list(gen)
            row["latency_s"] = time.monotonic() - t0
            row["end_s"] = time.monotonic() - t_start[0]
        except BaseException as e:  # noqa: BLE001 - reported
            row["error"] = f"{type(e).__name__}: {e}"
            errors.append(i)
            if all_open is not None:
                all_open.abort()
        rows[i] = row

    t_start = [0.0]
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    start.wait()
    t_start[0] = time.monotonic()
    busy = None
    if all_open is not None:
        try:
            all_open.wait()
            t_busy = time.monotonic()
            try:
                with connect(conn_file, dealer=dealer_client) as c:
                    next(c.generate(prompts[0], 1, provider=provider))
                busy = {"refused": False, "error": "the extra session was served"}
            except RemoteError as e:
                busy = {"refused": e.code == "busy", "code": e.code, "retry_after": e.retry_after, "message": str(e),
                        "seconds": round(time.monotonic() - t_busy, 2)}
            log(f"extra session while {n} open: {busy}")
        except threading.BrokenBarrierError:
            busy = {"refused": None, "error": "not every session opened"}
        finally:
            go_on.set()
    for th in threads:
        th.join()
    wall = time.monotonic() - t_start[0]
    return {"rows": [rows[i] for i in range(n)], "wall_s": wall, "errors": errors, "busy": busy}


def summarize(rows: list[dict], wall: float) -> dict:
    ok = [r for r in rows if "error" not in r]
    lat = [r["latency_s"] for r in ok]
    first = [r["first_token_s"] for r in ok]
    dec = [d for r in ok for d in r["decode_s"]]
    ntok = sum(len(r["tokens"]) for r in ok)

    def st(xs):
        return ({"min": round(min(xs), 2), "median": round(statistics.median(xs), 2), "max": round(max(xs), 2)}
                if xs else None)
    return {"sessions_ok": len(ok), "sessions_failed": len(rows) - len(ok), "tokens": ntok,
            "wall_s": round(wall, 2), "throughput_tokens_per_s": round(ntok / wall, 4) if wall else None,
            "sessions_per_min": round(60 * len(ok) / wall, 3) if wall else None,
            "latency_s": st(lat), "first_token_s": st(first), "decode_step_s": st(dec),
            "prefill_step_s": st([r["prefill_s"] for r in ok if "prefill_s" in r])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2, help="New tokens per session (prefill + tokens-1 decodes).")
    ap.add_argument("--provider", choices=("dealer", "he"), default="dealer")
    ap.add_argument("--model", default=None, help="Checkpoint folder or shipped model (default: the tests' tiny GPT).")
    ap.add_argument("--workers", type=int, default=1, help="Worker actors of the embedded server.")
    ap.add_argument("--max-sessions", type=int, default=None, help="Embedded server's --max-sessions "
                                                                     "(default: --sessions).")
    ap.add_argument("--connect", default=None, help="A running server's connection file (no embedded server).")
    ap.add_argument("--dealer", default=None, help="With --connect and --provider dealer: the dealer's client file.")
    ap.add_argument("--check-busy", action=argparse.BooleanOptionalAction, default=None,
                    help="Hold all sessions open and expect one more to be refused as busy "
                         "(default: on when --max-sessions equals --sessions).")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="First one session alone (the unloaded latency).")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "load.json"))
    args = ap.parse_args(argv)
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # this process is the client: as `cryptogen generate` (cryptogen/memory.py)
    if args.sessions < 1 or args.tokens < 1:
        ap.error("--sessions and --tokens must be at least 1")
    if args.connect and args.provider == "dealer" and not args.dealer:
        ap.error("--provider dealer with --connect needs --dealer (the dealer's client connection file)")

    from cryptogen.bench import git_commit, machine
    max_sessions = args.max_sessions or args.sessions
    check_busy = args.check_busy
    if check_busy is None:
        check_busy = not args.connect and max_sessions == args.sessions
    load0 = load_average()
    emb = None
    try:
        if args.connect:
            conn_file, dealer_client, folder = args.connect, args.dealer, None
            if args.model:
                from cryptogen.registry import resolve_model
                folder = resolve_model(args.model).resolve()
            vocab = None
        else:
            log(f"starting a server (--workers {args.workers} --max-sessions {max_sessions}, provider {args.provider})")
            emb = Embedded(args.model, args.workers, max_sessions, args.provider)
            conn_file, dealer_client, folder = emb.conn_file, emb.dealer_client, emb.folder
            log(f"server ready in {emb.start_s:.1f} s")
        if folder is not None:
            from cryptogen.model import GPT
            cfg = GPT.read_config(folder)
            vocab = cfg.vocab_size
        prompts = prompts_for(args.sessions, vocab or 256)
        expected = greedy_reference(folder, prompts, args.tokens) if folder is not None else None

        baseline = None
        if args.baseline:
            log("baseline: one session alone")
            b = run_sessions(conn_file, dealer_client, prompts[:1], args.tokens, args.provider, False)
            baseline = {**summarize(b["rows"], b["wall_s"]), "rows": b["rows"]}
            if emb is not None:
                emb.wait_idle()
        if emb is not None:
            from cryptogen.bench_ray import server_cpu
            cpu0 = (time.process_time(), server_cpu(emb.pid))
            before = emb.metrics()
        log(f"{args.sessions} concurrent sessions x {args.tokens} tokens ({args.provider})")
        r = run_sessions(conn_file, dealer_client, prompts, args.tokens, args.provider, check_busy)
        cpu = metrics_after = None
        if emb is not None:
            cpu1 = (time.process_time(), server_cpu(emb.pid))
            cpu = {"client_and_dealer": round(cpu1[0] - cpu0[0], 1),
                   **{k: round(cpu1[1][k] - cpu0[1][k], 1) for k in cpu1[1]}}
            after = emb.wait_idle()
            keys = ["cryptogen_server_sessions_open", "cryptogen_server_sessions_total",
                    'cryptogen_server_sessions_refused_total{reason="busy"}', "cryptogen_server_sessions_failed_total"]
            metrics_after = {k: after.get(k) for k in keys}
            metrics_after["sessions_opened_during_run"] = (after.get(keys[1], 0) - before.get(keys[1], 0))
            metrics_after["busy_refusals_during_run"] = (after.get(keys[2], 0) - before.get(keys[2], 0))
        for i, row in enumerate(r["rows"]):
            if expected is not None and "error" not in row:
                row["greedy_match"] = row["tokens"] == expected[i]
        summary = summarize(r["rows"], r["wall_s"])
        if expected is not None:
            summary["all_equal_to_plaintext_greedy"] = all(row.get("greedy_match") for row in r["rows"])
        if baseline and baseline["latency_s"] and summary["latency_s"]:
            summary["speedup_vs_sequential"] = round(args.sessions * baseline["latency_s"]["median"] / r["wall_s"], 2)
    finally:
        if emb is not None:
            emb.close()
    load1 = load_average()

    report = {
        "command": " ".join([".venv/bin/python", "scripts/load.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(),
        "load_average_1min": {"before": load0, "after": load1},
        "config": {"sessions": args.sessions, "tokens": args.tokens, "provider": args.provider,
                   "model": emb.model_name if emb is not None else (args.model or "(remote)"),
                   "server": "embedded" if emb is not None else args.connect, "workers": args.workers,
                   "max_sessions": max_sessions if emb is not None else None,
                   "server_start_s": round(emb.start_s, 1) if emb is not None else None},
        "baseline_one_session": baseline,
        "concurrent": summary, "busy_check": r["busy"], "server_metrics_after": metrics_after,
        "cpu_seconds": cpu, "sessions": [_round(row) for row in r["rows"]],
        "notes": ["latency_s: connect to the last token; first_token_s includes the client's keys, its public "
                  "context upload (~80 MB at n=16384) and the links; throughput = all tokens / wall time of the "
                  "concurrent run; with the busy check every session waits at its first token until all are open "
                  "(and the extra client was refused), so latencies include that wait",
                  "cpu_seconds (embedded): client_and_dealer = this process; gateway = the serve process; "
                  "workers = its WorkerActor processes; ray = its other Ray processes"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"{'session':>7} {'prompt':>6} {'connect s':>9} {'1st token s':>11} {'decode s (median)':>17} "
          f"{'latency s':>9}  tokens")
    for row in report["sessions"]:
        if "error" in row:
            print(f"{row['session']:>7} {row['prompt_len']:>6}  ERROR {row['error']}")
            continue
        dec = statistics.median(row["decode_s"]) if row["decode_s"] else float("nan")
        print(f"{row['session']:>7} {row['prompt_len']:>6} {row['connect_s']:>9.2f} {row['first_token_s']:>11.2f} "
              f"{dec:>17.2f} {row['latency_s']:>9.2f}  {row['tokens']}"
              + ("" if row.get("greedy_match", True) else "  != greedy"))
    s = summary
    median = s["latency_s"]["median"] if s["latency_s"] else "-"
    alone = baseline["latency_s"]["median"] if baseline and baseline["latency_s"] else None
    print(f"total: {s['sessions_ok']}/{args.sessions} sessions, {s['tokens']} tokens in {s['wall_s']:.1f} s = "
          f"{s['throughput_tokens_per_s']:.3f} tokens/s; latency median {median} s"
          + (f"; one session alone {alone} s" if alone is not None else "")
          + (f"; greedy {'OK' if s.get('all_equal_to_plaintext_greedy') else 'MISMATCH'}" if expected else ""))
    if r["busy"] is not None:
        print(f"extra session while {args.sessions} open: {r['busy']}")
    if cpu:
        print(f"CPU s: {cpu}")
    log(f"wrote {out}")
    bad = s["sessions_failed"] or (expected is not None and not s.get("all_equal_to_plaintext_greedy")) \
        or (r["busy"] is not None and not r["busy"].get("refused"))
    return 1 if bad else 0


def _round(row: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v] if k == "decode_s" else v)
            for k, v in row.items()}


if __name__ == "__main__":
    sys.exit(main())
