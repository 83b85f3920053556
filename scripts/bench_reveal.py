"""Cost of token-only output (``--reveal token``): the 2PC argmax over a vocabulary, per token.

Runs ``mpc/argmax.py`` on one row of random logit shares, both parties in this process
(``simulate``), and reports wall time, rounds, bytes sent per party and the correlated
randomness it consumes (Beaver triples, solved bits). With ``--provider he`` the triples are
made dealer-free (HE between the parties, the default provider of ``cryptogen generate``) inside
the run, so the time includes that offline work; ``dealer`` measures the online protocol alone.

    python scripts/bench_reveal.py --vocab 4096,50257 --provider dealer,he --out docs/bench/reveal.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptogen.field import FixedPoint  # noqa: E402
from cryptogen.he.params import HEConfig  # noqa: E402
from cryptogen.mpc import reconstruct, share, simulate  # noqa: E402
from cryptogen.mpc.argmax import argmax_last, open_to_client  # noqa: E402
from cryptogen.mpc.provider import DealerProvider  # noqa: E402


def one(vocab: int, provider: str) -> dict:
    fp: FixedPoint = HEConfig().fixed_point
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 3, vocab)
    xc, xs = share(fp.encode(logits, scale_bits=2 * fp.frac_bits))
    if provider == "he":
        from cryptogen.mpc.provider_he import HEProvider
        prov = HEProvider(lookahead=0)
    else:
        prov = DealerProvider()
    st: dict = {}
    t0 = time.perf_counter()
    token, _ = simulate(lambda p, x: open_to_client(p, argmax_last(p, x)[1]), (xc,), (xs,), provider=prov,
                        stats=st, timeout=3600)
    seconds = time.perf_counter() - t0
    assert int(token[0]) == int(np.argmax(fp.decode(reconstruct(xc, xs), 2 * fp.frac_bits)))
    ch = st["client"]["channel"]
    online = {k: v for k, v in ch.items() if k != "offline"}
    rnd = st["client"]["randomness"]
    return dict(vocab=vocab, provider=provider, seconds=round(seconds, 3),
                rounds=sum(v["rounds"] for v in online.values()),
                online_bytes_sent_per_party=sum(v["bytes_sent"] for v in online.values()),
                offline_bytes_sent_client=ch.get("offline", {}).get("bytes_sent", 0),
                consumed=rnd.get("consumed", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="4096,50257")
    ap.add_argument("--provider", default="dealer,he")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for provider in a.provider.split(","):
        for v in (int(x) for x in a.vocab.split(",")):
            r = one(v, provider)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        meta = dict(command="python " + " ".join(sys.argv), date=str(date.today()), machine=platform.platform(),
                    cpus=__import__("os").cpu_count())
        Path(a.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
