"""What a fault costs: a server worker killed mid-step, and a client whose connection drops.

Starts ``cryptogen serve`` embedded in this process (the gateway, Ray workers) and a Ray-free
client over TLS on loopback, then generates the same tokens three times, side by side:
  clean   no fault;
  worker  the process of worker ``--kill-worker`` killed by pid (SIGKILL) inside decode step
          ``--fault-step``: Ray restarts it, it reloads its weights and the session's KV cache
          from the last checkpoint, both parties redo the step;
  resume  every socket of the client aborted inside the same step: the client reconnects with
          its session id and resume secret, both parties roll back and redo the step.
Each faulted run must give the clean run's tokens. Reports the extra seconds over the clean run,
the client's own recovery time (new links + randomness for the rest of the request), and the
per-step checkpoint cost (the KV bytes the gateway keeps).

    python scripts/bench_faults.py --model models/wikitext2 --workers 2 --tokens 8 --out docs/bench/faults.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(conn_file: str, prompt, tokens: int, provider: str, fault=None, fault_step: int = 2) -> dict:
    import cryptogen.client.remote as remote

    chans, dial = [], remote.dial

    def recording_dial(*a, **k):
        chans.append(dial(*a, **k))
        return chans[-1]
    remote.dial = recording_dial
    steps, fired = [], []

    def on_step(t):
        steps.append(round(t.seconds, 3))
        if fault and len(steps) == fault_step and not fired:
            fired.append(time.perf_counter())
            threading.Timer(0.5, fault, args=(chans,)).start()  # inside the next (decode) step
    try:
        t0 = time.perf_counter()
        with remote.connect(conn_file) as c:
            out = list(c.generate(prompt, tokens, provider=provider, on_step=on_step))
            total = time.perf_counter() - t0
            return dict(tokens=out, seconds=round(total, 2), step_seconds=steps, offline_s=round(c.last_offline_s, 2),
                        recoveries=[dict(reason=r.reason, position=r.position, client_seconds=round(r.seconds, 2))
                                    for r in c.recoveries])
    finally:
        remote.dial = dial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "wikitext2"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-worker", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--fault-step", type=int, default=3, help="the fault lands inside the step after this one")
    ap.add_argument("--provider", default="he", choices=("he", "dealer"))
    ap.add_argument("--prompt", default="The history of the")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not 1 <= a.fault_step < a.tokens:
        ap.error("--fault-step must be in [1, --tokens)")
    if not 0 <= a.kill_worker < a.workers:
        ap.error("--kill-worker must name one of the --workers")

    import ray

    from cryptogen.cluster.connect import shutdown
    from cryptogen.server.serve import ServeOptions, start

    tmp = Path(tempfile.mkdtemp(prefix="cryptogen-faults-"))
    opts = ServeOptions(model=a.model, workers=a.workers, listen="127.0.0.1:0",
                        connection_file=str(tmp / "server.json"), state_dir=str(tmp / "state"), num_cpus=a.workers + 2)
    gw, pool, _, _ = start(opts)
    try:
        def kill(_chans):
            os.kill(pool.identities[a.kill_worker][1], signal.SIGKILL)

        def drop(chans):
            for ch in list(chans):
                ch.abort()
        results = {}
        for name, fault in (("clean", None), ("worker", kill), ("resume", drop)):
            print(f"[bench_faults] {name} ...", file=sys.stderr, flush=True)
            results[name] = run(opts.connection_file, a.prompt, a.tokens, a.provider, fault, a.fault_step)
            print(f"[bench_faults] {name}: {results[name]['seconds']} s, recoveries {results[name]['recoveries']}",
                  file=sys.stderr, flush=True)
        stats = gw.stats.as_dict()
        clean = results["clean"]
        summary = {name: dict(equal_tokens=r["tokens"] == clean["tokens"],
                              extra_seconds=round(r["seconds"] - clean["seconds"], 2),
                              faulted_step_seconds=r["step_seconds"][a.fault_step] if len(r["step_seconds"]) > a.fault_step
                              else None)
                   for name, r in results.items() if name != "clean"}
        out = dict(command="python scripts/bench_faults.py " + " ".join(sys.argv[1:]), date=str(date.today()),
                   machine=f"{platform.machine()} {os.cpu_count()} cpus", model=Path(a.model).name,
                   workers=a.workers, provider=a.provider, tokens=a.tokens, fault_step=a.fault_step,
                   clean_step_seconds=clean["step_seconds"][a.fault_step], kv_bytes_per_session_max=stats["kv_max"],
                   server_recoveries=stats["recoveries"], summary=summary, runs=results)
        text = json.dumps(out, indent=1)
        print(text)
        if a.out:
            Path(a.out).write_text(text + "\n")
    finally:
        gw.close()
        pool.shutdown()
        shutdown()
        del ray


if __name__ == "__main__":
    main()
