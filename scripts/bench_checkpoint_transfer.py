"""How long a worker's checkpoint takes to reach Ray's object store, by the type of its blobs: an
actor returns (meta, blobs) with ``num_returns=2``, as ``WorkerActor.checkpoint`` does, and the
caller waits for the meta only (as the gateway does after each step). Blobs as ``bytes`` go through
Ray's msgpack serialiser; as uint8 arrays, one copy into the object store. Alternated runs.

    .venv/bin/python scripts/bench_checkpoint_transfer.py --mib 600 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=600, help="checkpoint size (GPT-2 base at 511 context: ~600)")
    ap.add_argument("--blobs", type=int, default=24, help="blobs it is cut into (one per layer and head group)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    if a.mib < 1 or a.blobs < 1 or a.repeats < 1:
        raise SystemExit("error: --mib, --blobs and --repeats must be positive")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote
    class Holder:
        def __init__(self, size: int, blobs: int):
            self.data = {f"{i}/0": os.urandom(size // blobs) for i in range(blobs)}

        def checkpoint(self, as_array: bool):
            return {"caches": len(self.data)}, {k: np.frombuffer(v, np.uint8) if as_array else v
                                                 for k, v in self.data.items()}

    h = Holder.remote(a.mib << 20, a.blobs)
    ray.get(h.checkpoint.options(num_returns=2).remote(False)[0])  # warm up
    for _ in range(a.repeats):
        for as_array in (False, True):
            t0 = time.perf_counter()
            meta, blobs = h.checkpoint.options(num_returns=2).remote(as_array)
            ray.get(meta)
            print(f"{'uint8 arrays' if as_array else 'bytes':>12}: {time.perf_counter() - t0:.2f} s until the meta "
                  f"({a.mib} MiB in {a.blobs} blobs)", flush=True)
            del blobs
    ray.shutdown()


if __name__ == "__main__":
    main()
