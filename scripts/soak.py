"""Soak: many sequential sessions against one ``cryptogen serve``; does anything grow? (issue #13)

    nice .venv/bin/python scripts/soak.py [--sessions 50] [--tokens 2] [--provider dealer|he]
        [--model PATH] [--every 1] [--warmup 10] [--out docs/bench/soak.json]

Starts a server in its own process (``scripts/load.py``'s ``Embedded``: ``cryptogen serve`` with its own
embedded Ray, one worker actor by default, over ``--model`` or the tests' tiny GPT-2) and runs
``--sessions`` sessions one after another, each a new client connection (its own keys, TLS control
connection and data links) generating ``--tokens`` tokens. After every ``--every`` sessions, once the
server's metrics show no open session and no KV cache, it records from /proc (no psutil), for the
serve process, each of its ``ray::WorkerActor`` descendants, its other Ray processes (summed) and this
client process: RSS (and its anonymous / shared-memory parts), threads, open file descriptors.

Summary per process and quantity: mean of the first 10 samples after warm-up vs the last 10, the
least-squares slope per session after warm-up, and the growth from the end of warm-up to the end.
Verdict "no growth" (server processes: serve + workers):
  RSS: over the post-warm-up sessions, both the growth of the means (last-10 mean minus first-10
  mean) and the fitted trend (slope x sessions) < max(20 MB, 5 % of the first-10 mean); single
  samples are not compared (a worker's RSS moves by +-50 MB from one session to the next: glibc
  hands freed memory back to the OS late and per arena);
  threads, fds: the last 10 samples never exceed the largest of the first 10 post-warm-up samples,
  and the last sample is not above the first post-warm-up one (exact counts: one per session shows).
``--rescore FILE`` recomputes the summaries and verdicts of FILE (and its variants) from its series.

``--server-env KEY=VALUE`` (repeatable) starts the server with that environment (its Ray workers
inherit it), e.g. ``MALLOC_ARENA_MAX=2``; ``--variant-of FILE`` appends this run's report to FILE's
``variants`` list instead of writing ``--out`` (a comparison run beside the main one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import ROOT, Embedded, greedy_reference, load_average, log, prompts_for  # noqa: E402

MB = 1 << 20
RSS_TOL_MB, RSS_TOL_FRAC = 20.0, 0.05


# ---- /proc ----------------------------------------------------------------------------------------
def _procs() -> dict:
    """{pid: (ppid, cmdline)} of every readable process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), cmd)
    return out


def descendants(root: int) -> dict:
    procs = _procs()
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, cmd) in procs.items():
            if ppid == parent and pid not in out:
                out[pid] = cmd
                todo.append(pid)
    return out


def usage(pid: int) -> dict | None:
    """RSS (MB: total, anonymous, shared memory), threads and open fds of one process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    f = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        f[key] = value.split()
    kb = lambda k: int(f[k][0]) / 1024 if k in f else None  # noqa: E731
    return {"rss_mb": kb("VmRSS"), "rss_anon_mb": kb("RssAnon"), "rss_shmem_mb": kb("RssShmem"),
            "threads": int(f["Threads"][0]), "fds": fds}


def sample(serve_pid: int) -> dict:
    """Usage of the serve process, each WorkerActor, the other Ray processes (summed) and this process."""
    tree = descendants(serve_pid)
    out = {"serve": usage(serve_pid), "client": usage(os.getpid()), "workers": {}}
    other = {"rss_mb": 0.0, "threads": 0, "fds": 0, "processes": 0}
    for pid, cmd in sorted(tree.items()):
        u = usage(pid)
        if u is None:
            continue
        if cmd.startswith("ray::WorkerActor"):
            out["workers"][str(pid)] = u
        else:
            other["rss_mb"] += u["rss_mb"] or 0
            other["threads"] += u["threads"]
            other["fds"] += u["fds"]
            other["processes"] += 1
    out["ray_other"] = other
    return out


# ---- summary ------------------------------------------------------------------------------------
def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def summarize_series(xs: list[int], ys: list[float], warmup: int, window: int = 10) -> dict:
    """First/last ``window`` means after warm-up, slope per session, growth over the post-warm-up part."""
    post = [(x, y) for x, y in zip(xs, ys) if x > warmup and y is not None]
    if not post:
        return {}
    px, py = [p[0] for p in post], [p[1] for p in post]
    first, last = py[:window], py[-window:]
    s = _slope(px, py)
    return {"first10_mean": round(sum(first) / len(first), 3), "last10_mean": round(sum(last) / len(last), 3),
            "first10_max": max(first), "last10_max": max(last),
            "at_warmup_end": py[0], "at_end": py[-1], "growth": round(py[-1] - py[0], 3),
            "growth_of_means": round(sum(last) / len(last) - sum(first) / len(first), 3),
            "slope_per_session": round(s, 5) if s is not None else None,
            "all_first10_mean": round(sum(ys[:window]) / len(ys[:window]), 3) if ys[:window] else None,
            "sessions": [px[0], px[-1]]}


def verdict_for(summary: dict) -> dict:
    """Pass/fail per quantity (see the module's docstring)."""
    out = {}
    rss = summary.get("rss_mb")
    if rss:
        tol = max(RSS_TOL_MB, RSS_TOL_FRAC * rss["first10_mean"])
        trend = (rss["slope_per_session"] or 0.0) * (rss["sessions"][1] - rss["sessions"][0])
        out["rss"] = {"pass": rss["growth_of_means"] < tol and trend < tol,
                      "growth_of_means_mb": round(rss["growth_of_means"], 1), "trend_mb": round(trend, 1),
                      "tolerance_mb": round(tol, 1)}
    for q in ("threads", "fds"):
        s = summary.get(q)
        if s:
            out[q] = {"pass": s["last10_max"] <= s["first10_max"] and s["at_end"] <= s["at_warmup_end"],
                      "at_warmup_end": s["at_warmup_end"], "at_end": s["at_end"], "last10_max": s["last10_max"],
                      "first10_max": s["first10_max"]}
    out["pass"] = all(v["pass"] for v in out.values())
    return out


def score(series: dict, warmup: int, errors: list) -> tuple[dict, dict, bool]:
    """(summary, verdicts per process, overall pass) of the recorded series."""
    summary, verdicts = {}, {}
    for name, d in series.items():
        xs = d["session"]
        summary[name] = {q: summarize_series(xs, d[q], warmup)
                         for q in ("rss_mb", "rss_anon_mb", "rss_shmem_mb", "threads", "fds") if q in d}
        verdicts[name] = verdict_for(summary[name])
    server_procs = [n for n in verdicts if n == "serve" or n.startswith("worker ")]
    overall = bool(server_procs) and all(verdicts[n]["pass"] for n in server_procs) and not errors
    return summary, verdicts, overall


def rescore(path: Path) -> int:
    report = json.loads(path.read_text())
    ok = True
    for r in [report, *report.get("variants", [])]:
        r["summary"], r["verdicts"], overall = score(r["series"], r["config"]["warmup"], r["errors"])
        r["verdict"] = "pass" if overall else "fail"
        r["criteria"] = CRITERIA
        ok = ok and (overall or r is not report)
        print(f"{r['command']}: {r['verdict']}; " + "; ".join(
            f"{n}: {'pass' if v['pass'] else 'FAIL'}" for n, v in r["verdicts"].items()))
    path.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if ok else 1


CRITERIA = {"rss": f"over the post-warm-up sessions: last-10 mean minus first-10 mean, and slope x sessions, both < "
                   f"max({RSS_TOL_MB:.0f} MB, {RSS_TOL_FRAC:.0%} of the first-10 mean)",
            "threads_fds": "last-10 max <= first-10 max after warm-up, and the last sample <= the first "
                           "post-warm-up sample",
            "verdict": "serve process and every WorkerActor pass, and no session failed (client and ray_other: "
                       "recorded, not judged)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=2)
    ap.add_argument("--provider", choices=("dealer", "he"), default="dealer")
    ap.add_argument("--model", default=None, help="Checkpoint folder or shipped model (default: the tests' tiny GPT).")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--every", type=int, default=1, help="Sample after every N sessions.")
    ap.add_argument("--warmup", type=int, default=10, help="Sessions before the no-growth window starts.")
    ap.add_argument("--reuse-connection", action="store_true", help="One client connection for every session "
                                                                    "(default: a new connection per session).")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="Environment of the server process and its Ray workers (repeatable).")
    ap.add_argument("--variant-of", default=None, help="Append this run to FILE's 'variants' instead of --out.")
    ap.add_argument("--rescore", default=None, metavar="FILE", help="Only recompute FILE's summaries and verdicts.")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "soak.json"))
    args = ap.parse_args(argv)
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # this process is the client: as `cryptogen generate` (cryptogen/memory.py)
    if args.rescore:
        return rescore(Path(args.rescore))
    if any("=" not in e for e in args.server_env):
        ap.error("--server-env takes KEY=VALUE")
    server_env = dict(e.split("=", 1) for e in args.server_env)
    if args.sessions <= args.warmup + 10:
        ap.error("--sessions must exceed --warmup by more than 10 (first/last 10 samples after warm-up)")

    from cryptogen.bench import git_commit, machine
    from cryptogen.client.remote import connect

    load0, t_start = load_average(), time.monotonic()
    log(f"starting a server (--workers {args.workers}), provider {args.provider}")
    emb = Embedded(args.model, args.workers, 1, args.provider, env=server_env)
    samples, latencies, errors, mismatches, pids_seen = [], [], [], [], {}
    try:
        log(f"server ready in {emb.start_s:.1f} s (pid {emb.pid})")
        from cryptogen.model import GPT
        vocab = GPT.read_config(emb.folder).vocab_size
        prompts = prompts_for(8, vocab)
        expected = greedy_reference(emb.folder, prompts, args.tokens)
        s0 = sample(emb.pid)
        samples.append({"session": 0, "t": 0.0, **s0})
        log(f"before any session: serve {s0['serve']}, workers {s0['workers']}")
        conn = connect(emb.conn_file, dealer=emb.dealer_client) if args.reuse_connection else None
        for i in range(1, args.sessions + 1):
            p = prompts[(i - 1) % len(prompts)]
            t0 = time.monotonic()
            try:
                if conn is None:
                    with connect(emb.conn_file, dealer=emb.dealer_client) as c:
                        toks = list(c.generate(p, args.tokens, provider=args.provider))
                else:
                    toks = list(conn.generate(p, args.tokens, provider=args.provider))
                if toks != expected[(i - 1) % len(prompts)]:
                    mismatches.append(i)
            except Exception as e:  # noqa: BLE001 - recorded; the soak goes on
                errors.append({"session": i, "error": f"{type(e).__name__}: {e}"[:300]})
                log(f"session {i}: {type(e).__name__}: {e}")
            latencies.append(round(time.monotonic() - t0, 2))
            m = emb.wait_idle()  # strictly one session at a time (the server has --max-sessions 1)
            if i % args.every == 0 or i == args.sessions:
                s = sample(emb.pid)
                for pid in s["workers"]:
                    pids_seen.setdefault(pid, i)
                samples.append({"session": i, "t": round(time.monotonic() - t_start, 1), **s,
                                "sessions_open": m.get("cryptogen_server_sessions_open"),
                                "kv_bytes": sum(v for k, v in m.items() if k.startswith("cryptogen_kv_cache_bytes"))})
                w = "; ".join(f"worker {pid}: {u['rss_mb']:.0f} MB {u['threads']} thr {u['fds']} fds"
                              for pid, u in s["workers"].items())
                log(f"session {i}/{args.sessions} {latencies[-1]:.1f} s | serve {s['serve']['rss_mb']:.0f} MB "
                    f"{s['serve']['threads']} thr {s['serve']['fds']} fds | {w} | "
                    f"client {s['client']['rss_mb']:.0f} MB "
                    f"{s['client']['threads']} thr {s['client']['fds']} fds")
        if conn is not None:
            conn.close()
        final_metrics = emb.wait_idle()
    finally:
        emb.close()

    # the series, per process: serve, each worker (by pid; a restarted worker is a new series), client
    series: dict = {}
    for s in samples:
        procs = {"serve": s["serve"], "client": s["client"], "ray_other": s["ray_other"],
                 **{f"worker {pid}": u for pid, u in s["workers"].items()}}
        for name, u in procs.items():
            if u is None:
                continue
            d = series.setdefault(name, {"session": []})
            d["session"].append(s["session"])
            for q, v in u.items():
                d.setdefault(q, []).append(round(v, 2) if isinstance(v, float) else v)
    summary, verdicts, overall = score(series, args.warmup, errors)
    report = {
        "command": " ".join(["nice", ".venv/bin/python", "scripts/soak.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": machine(),
        "load_average_1min": {"before": load0, "after": load_average()},
        "config": {"sessions": args.sessions, "tokens": args.tokens, "provider": args.provider,
                   "model": emb.model_name, "workers": args.workers, "every": args.every, "warmup": args.warmup,
                   "connection": "one per session" if not args.reuse_connection else "one for all",
                   "server_env": server_env,
                   "server_start_s": round(emb.start_s, 1)},
        "criteria": CRITERIA,
        "verdict": "pass" if overall else "fail",
        "verdicts": verdicts,
        "errors": errors, "greedy_mismatches": mismatches,
        "latency_s": {"first10_mean": round(sum(latencies[:10]) / min(10, len(latencies)), 2),
                      "last10_mean": round(sum(latencies[-10:]) / min(10, len(latencies)), 2),
                      "all": latencies},
        "worker_pids": pids_seen,
        "server_metrics_after": {k: v for k, v in final_metrics.items() if k.startswith("cryptogen_server_")},
        "wall_s": round(time.monotonic() - t_start, 1),
        "summary": summary,
        "series": series,
    }
    if args.variant_of:
        out = Path(args.variant_of)
        main_report = json.loads(out.read_text())
        main_report.setdefault("variants", []).append(report)
        out.write_text(json.dumps(main_report, indent=1) + "\n")
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'process':<16} {'quantity':<12} {'first10':>9} {'last10':>9} {'slope/session':>13}  verdict")
    for name in series:
        for q in ("rss_mb", "rss_anon_mb", "threads", "fds"):
            s = summary[name].get(q)
            if not s:
                continue
            v = verdicts[name].get(q.replace("_mb", "") if q == "rss_mb" else q, {})
            print(f"{name:<16} {q:<12} {s['first10_mean']:>9} {s['last10_mean']:>9} {s['slope_per_session']:>13}  "
                  f"{'' if not v else ('pass' if v['pass'] else 'FAIL')}")
    print(f"verdict: {report['verdict']} ({len(errors)} failed sessions, {len(mismatches)} greedy mismatches, "
          f"{report['wall_s']:.0f} s)")
    log(f"wrote {out}")
    return 0 if overall else 1


if __name__ == "__main__":
    sys.exit(main())
