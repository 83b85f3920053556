"""One recompute token against kv-reuse tokens at one context, in one run, timed stage by stage.

A recompute step at context C (``Driver(mode="recompute").decode_one_token(C)``: the cache dropped,
then one batched prefill pass over all C + 1 tokens, the LM head on the last) leaves the encrypted
caches full. So the kv-reuse steps are measured right after it, in the same session, on the same
keys and shards, at positions C + 1, C + 2, ...:

  1. the recompute step at position C, the dealer making its items inside the step (no dealer
     works ahead of a recompute step here: a whole prefill's items do not fit memory);
  2. the first kv-reuse step, its dealer items made inside it too (like for like with step 1);
  3. the later kv-reuse steps, each after the dealer made its items ahead, untimed (as deployed).

Every ``Driver.stage`` is timed, so the report also gives each stage's seconds per layer. All
layers of a model have the same shapes and the protocols' work does not depend on the values, so
``compose`` gives, from one run of a model with few layers, both steps for a model of the same
width with more layers: embed + n_layer x (per-layer stages) + final LayerNorm + head. It is a
composition of measured stages, not one measured step; the report says so.

Each step also reports its secure token and max |secure - float64 logit| on the same tokens, with
float64's top-2 margin there (an argmax that flips below the error is a near-tie, not a fault).

Both parties run in this process (no Ray, one worker, the in-process dealer), like
``long_context_decode_error.py``.

    .venv/bin/python -m cryptogen.cli init --layers 1 --out /tmp/g2l1
    .venv/bin/python scripts/recompute_by_stage.py --model /tmp/g2l1 --context 511 --tokens 2 --compose 12 --out docs/bench/recompute_by_stage_gpt2_1layer_511.json
    .venv/bin/python scripts/recompute_by_stage.py --model wikitext2 --context 64 --tokens 2
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYER_STAGES = ("layernorm", "attention", "mlp")


def timed_driver(runner, cfg, plan):
    """A recompute-mode Driver whose stages add their seconds to ``driver.seconds[name]``; the
    layer's LayerNorms are told from the final one by the layer number in their server arguments."""
    from cryptogen.driver import Driver

    class TimedDriver(Driver):
        def stage(self, name, workers, client, server):
            t0 = time.perf_counter()
            out = super().stage(name, workers, client, server)
            final = name == "layernorm" and server[0] is None
            self.seconds["ln_f" if final else name] += time.perf_counter() - t0
            return out

    d = TimedDriver(runner, cfg, plan, mode="recompute")
    d.seconds = defaultdict(float)
    return d


def step(driver, position: int, mode: str) -> dict:
    driver.mode, driver.seconds = mode, defaultdict(float)
    ct_pt = lambda: sum(s.stats.ct_pt_mul for s in driver.r.shards.values())  # noqa: E731 - the server's
    before = ct_pt()
    total = driver.decode_one_token(position).seconds
    n = driver.cfg.n_layer
    per_layer = {k: driver.seconds.get(k, 0.0) / n for k in LAYER_STAGES}
    return {"position": position, "context": position + 1, "mode": mode, "seconds": round(total, 2),
            "stages": {k: round(v, 2) for k, v in driver.seconds.items()},
            "per_layer": {k: round(v, 3) for k, v in per_layer.items()},
            "outside_stages": round(total - sum(driver.seconds.values()), 2), "ct_pt": ct_pt() - before}


def compose(row: dict, n_layer: int) -> float:
    """A step's seconds for the same width with ``n_layer`` layers, from this run's stages."""
    s = row["stages"]
    return (s.get("embed", 0.0) + n_layer * sum(row["per_layer"].values()) + s.get("ln_f", 0.0)
            + s.get("head", 0.0) + row["outside_stages"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a shipped model name or a checkpoint folder, e.g. "
                    "cryptogen init --layers 1 --out /tmp/g2l1")
    ap.add_argument("--context", type=int, required=True, help="C: the recompute step is at position C "
                    "(C + 1 tokens in its pass)")
    ap.add_argument("--tokens", type=int, default=2, help="kv-reuse steps after it (>= 1)")
    ap.add_argument("--compose", type=int, default=0, help="also compose both steps for this many layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report to this JSON file")
    a = ap.parse_args()
    if a.tokens < 1 or a.context < 1 or a.compose < 0:
        ap.error("--context and --tokens must be at least 1, --compose at least 0")

    import torch

    from cryptogen.bench import dealer_ahead, git_commit, machine
    from cryptogen.model import GPT, CheckpointError
    from cryptogen.plan import make_plan
    from cryptogen.registry import ModelNotFound, resolve_model
    from cryptogen.scheduler.inprocess import InProcessRunner

    try:
        model, label = GPT.from_pretrained(resolve_model(a.model)), a.model
    except (ModelNotFound, CheckpointError) as e:
        ap.error(str(e))
    cfg = model.config
    if a.context + a.tokens >= cfg.n_positions:
        ap.error(f"--context {a.context} + --tokens {a.tokens} must stay below the model's {cfg.n_positions} positions")
    ids = [int(i) for i in np.random.default_rng(a.seed).integers(0, cfg.vocab_size, a.context + 1)]
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    t0 = time.perf_counter()
    runner = InProcessRunner(model, plan, ids)
    setup_s = time.perf_counter() - t0
    driver, ahead, rows = timed_driver(runner, cfg, plan), dealer_ahead(runner), []
    log = lambda m: print(f"[recompute_by_stage] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"set-up {setup_s:.0f} s; recompute step at position {a.context} ({a.context + 1} tokens in one pass)...")
    rows.append(step(driver, a.context, "recompute"))
    log(f"recompute: {rows[-1]['seconds']:.1f} s {rows[-1]['stages']}")
    ahead(None)
    for i in range(a.tokens):
        pos = a.context + 1 + i
        dealer_s = ahead(pos - 1) if i else None
        rows.append({**step(driver, pos, "kv-reuse"), "dealer": "ahead" if i else "inside the step",
                     **({"dealer_ahead_s": round(dealer_s, 2)} if i else {})})
        log(f"kv-reuse at position {pos}: {rows[-1]['seconds']:.2f} s {rows[-1]['stages']}")
    rc, kv = rows[0], rows[1]
    secure = runner.client.tokens[len(ids):]
    with torch.no_grad():  # the secure tokens against the plaintext model on the same prefix
        plain = list(model.generate(ids, len(secure), lambda lg: int(np.argmax(lg))))
        ref = GPT.from_pretrained(resolve_model(a.model)).double().eval()  # float64, on the secure tokens
        full = ref(torch.tensor([ids + secure[:-1]]))[0][0].numpy()
    for row, lg in zip(rows, runner.client.logit_history[-len(rows):]):
        ref_lg = np.sort(full[row["position"]])
        err = float(np.abs(lg - full[row["position"]]).max())  # max |secure - float64 logit|
        row.update(token=secure[row["position"] - a.context], max_logit_error=round(err, 4),
                   top2_margin=round(float(ref_lg[-1] - ref_lg[-2]), 4),  # float64's: a flip below it is a tie
                   same_argmax=bool(lg.argmax() == full[row["position"]].argmax()))
    report = {"model": label, "config": {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                                         "vocab_size": cfg.vocab_size},
              "steps": rows, "same_greedy": plain == secure, "plaintext_tokens": plain,
              "max_logit_error": max(r["max_logit_error"] for r in rows),
              "ratio_measured": round(rc["seconds"] / kv["seconds"], 1),
              "ratio_note": "recompute step / first kv-reuse step, both with their dealer items made inside",
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "setup_s": round(setup_s, 1), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "commit": git_commit(), "machine": machine()}
    if a.compose:
        c_rc, c_kv = compose(rc, a.compose), [compose(r, a.compose) for r in rows[1:]]
        report["composed"] = {"n_layer": a.compose, "recompute_s": round(c_rc, 1),
                              "kv_reuse_s": [round(x, 2) for x in c_kv], "ratio": round(c_rc / c_kv[0], 1),
                              "note": "embed + n_layer x this run's per-layer stages + final LN + head: "
                                      "composed from measured stages, not one measured step"}
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
