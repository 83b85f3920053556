#!/usr/bin/env python
"""One decode step's attention for one head group, per layer: the server's q.K and p.V products, their
exports (H2S), and the client's decryptions and own terms (issue #11; docs/BENCHMARKS.md "The attention
by ct x pt").

For C cache ciphertexts (a group of --heads heads of --d-head at C * tokens-per-ciphertext - 5 cached
tokens), medians of --repeats steps after one warm-up (the cache's kept NTT forms or preparations made
then, as in a decode). The code measured is whatever ``cryptogen`` is imported: run it with
``PYTHONPATH=<a worktree of 99289f6>`` (after symlinking the party folders into its cryptogen/) for
the ct x ct attention that came before.

    .venv/bin/python scripts/bench_attention.py [--contexts 7,26] [--heads 12] [--d-head 64] \
        [--repeats 3] [--out F.json]
"""
import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse, json, platform, sys, time  # noqa: E401,E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors
        sys.exit(f"bench_attention.py: error: {message}")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 7,26, got {text!r}")
    if not out or min(out) < 1 or max(out) > 64:
        raise argparse.ArgumentTypeError("cache ciphertext counts must be 1..64")
    return out


def main() -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=_ints, default=[7, 26], help="cache ciphertexts per head group")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d-head", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path")
    a = ap.parse_args()
    if a.repeats < 1 or a.heads < 1 or a.d_head < 1:
        ap.error("--repeats, --heads and --d-head must be at least 1")

    import numpy as np
    import cryptogen.he.arcc as arcc
    from cryptogen.field import random_elements
    from cryptogen.he import (ClientKeys, ClientRole, EncryptedKVCache, HEConfig, ServerEngine, ShapeError,
                              h2s_server, probs_slots, query_slots, s2h_server)

    by_ct_pt = hasattr(arcc, "local_scores")
    cfg = HEConfig()
    keys = ClientKeys.generate(cfg)
    cl, e, rng = ClientRole(keys), ServerEngine(keys.public_context()), np.random.default_rng(0)
    H, D, rows = a.heads, a.d_head, []
    for C in a.contexts:
        try:
            cache = EncryptedKVCache(e, D, heads=H)
        except ShapeError as exc:
            sys.exit(f"bench_attention.py: error: {exc}")
        lay = cache.layout
        T = max(1, C * lay.tpc - 5)
        K = random_elements((T, H, D), cfg.t, rng)
        K_s = random_elements(K.shape, cfg.t, rng)
        runs = lay.run_slots(0, (K - K_s) % cfg.t)
        cache.prefill(0, [cl.s2h_send(s) for _, s in runs], K_s, [cl.s2h_send(s) for _, s in runs], K_s)
        times = []
        for _ in range(a.repeats + 1):
            q, p = random_elements((H, D), cfg.t, rng), random_elements((H, T), cfg.t, rng)
            up_q = cl.s2h_send(query_slots(lay, q))
            up_p = [cl.s2h_send(probs_slots(lay, p, c)) for c in range(len(cache.v))]
            t0 = time.perf_counter()
            if by_ct_pt:  # the uploads are the client's shares; here the server's are q and p themselves
                outs = arcc.qk_decode(e, cache, e.receive(up_q), q, cl)
                pv = arcc.pv_decode(e, cache, [e.receive(b) for b in up_p], p, cl)
            else:
                outs = arcc.qk_decode(e, cache, s2h_server(e, up_q, query_slots(lay, q)), cl)
                pv = arcc.pv_decode(e, cache, [s2h_server(e, b, probs_slots(lay, p, c)) for c, b in enumerate(up_p)], cl)
            t1 = time.perf_counter()
            sent = [h2s_server(e, c)[0] for c in outs + [pv]]
            t2 = time.perf_counter()
            for b in sent:
                cl.h2s_receive(b)
            if by_ct_pt:
                arcc.local_scores(q, K, cfg.t)
                arcc.local_pv(p, K, cfg.t)
            t3 = time.perf_counter()
            times.append((t1 - t0, t2 - t1, t3 - t2))
        m = np.median(np.array(times[1:]), axis=0)
        row = {"cache_cts": C, "tokens": T, "products_ms": round(m[0] * 1e3, 1), "exports_ms": round(m[1] * 1e3, 1),
               "client_ms": round(m[2] * 1e3, 1), "total_ms": round(m.sum() * 1e3, 1)}
        rows.append(row)
        print(f"{'ct x pt' if by_ct_pt else 'ct x ct'} C={C} T={T}: products {row['products_ms']} ms, exports "
              f"{row['exports_ms']} ms, client {row['client_ms']} ms, total {row['total_ms']} ms per layer", flush=True)
    if a.out:
        out = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
               "path": "ct x pt" if by_ct_pt else "ct x ct", "heads": H, "d_head": D, "rows": rows}
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
