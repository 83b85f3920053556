"""The resident memory of one server worker's shard: a checkpoint's weights encoded as a 1-worker
plan's worker 0 holds them (linear layers in the NTT form, the field matrices the prefill re-encodes
from), in this process, without keys or sessions. Prints the RSS after loading the model, after the
shard is built and the model dropped, and the peak.

    PYTHONPATH=. .venv/bin/python scripts/shard_memory.py --model /tmp/g2full
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wikitext2", help="a shipped model's name or a checkpoint folder")
    a = ap.parse_args()
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # as the worker actor does
    from cryptogen import secure_plan as sp
    from cryptogen.model import GPT
    from cryptogen.plan import make_plan
    from cryptogen.registry import ModelNotFound, resolve_model
    from workers.shard import ServerShard
    try:
        model = GPT.from_pretrained(resolve_model(a.model))
    except (ModelNotFound, OSError) as e:
        sys.exit(f"error: {e}")
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    print(f"model loaded: RSS {rss_mib()} MiB", flush=True)
    t0 = time.perf_counter()
    shard = ServerShard(model, plan.workers[0], None, holds_ends=True, lead_layers=set(range(cfg.n_layer)),
                        embed_shards=sp.embed_owners(cfg, plan)[0], head_cols=sp.head_columns(cfg, plan).get(0))
    del model
    gc.collect()
    print(f"shard built in {time.perf_counter() - t0:.0f} s ({len(shard.linears)} encoded layers): RSS {rss_mib()} MiB, "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
