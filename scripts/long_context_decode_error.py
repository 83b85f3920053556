"""Secure decode steps at a long context, against float64, without the secure prefill before them.

A secure prefill of 512 tokens on GPT-2 base is hours of 2PC here; the decode steps after it are
what grows with the context (q.K and p.V over the whole cache, a softmax over every key). So the
encrypted KV caches are filled from the plaintext model instead, and only the decode steps run
securely (both parties in one process, no Ray, one worker, the in-process dealer):

  1. float64 forward over the first P tokens; each layer's K (times d_head^-1/4, as the secure
     path folds it into W_k) and V are rounded at 2^f, the secure path's cache encoding;
  2. they are split into uniform random shares and appended through the real KV-prefill
     protocol (``InProcessRunner.fill_caches``: ``twoparty.kv_prefill_client`` / ``_server``; the
     client encrypts its share, the server adds its own), so every cache ciphertext is what a
     secure prefill would leave, except that a secure prefill's K and V also carry its 2PC error;
  3. ``--tokens`` secure decode steps, the first at position P (the token there is the P+1-th
     token of the text), each compared with float64 logits on the same tokens (max error, the
     float64 top-2 margin, whether the argmax is the same); the secure greedy tokens against
     float64 greedy ones from the same prefix (``same_greedy``: one near-tie flips the rest).

What it does not measure: the error a secure prefill adds to the cached K and V (measured on the
WikiText-2 model by ``secure_error_by_position.py --window 512 --chunk 64``). With ``--prefill``
(``--prefill-chunk N``: in passes of N tokens) the caches come from a real secure prefill instead,
whose last position's logits are compared too; the first decoded token is then the secure one.

    .venv/bin/python scripts/long_context_decode_error.py --model /tmp/g2full --context 511 --tokens 2 \
        --out docs/bench/long_context_decode_gpt2.json
    .venv/bin/python scripts/long_context_decode_error.py --model wikitext2 --context 500 --tokens 4
    .venv/bin/python scripts/long_context_decode_error.py --model /tmp/g2full --context 128 --tokens 2 --prefill

``--model``: a shipped model (its test split's tokens) or a checkpoint folder such as
``bin/cryptogen init --out /tmp/g2full`` (GPT-2 base's shape and initialisation; no tokenizer, so
seeded random token ids).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def token_ids(name: str, model, n: int, seed: int) -> list[int]:
    """A shipped model's first n test tokens; seeded random ids for a folder without a tokenizer or data."""
    from cryptogen.data import DataError, first_tokens
    from cryptogen.registry import SHIPPED, resolve_model
    from cryptogen.tokenizer import TokenizerError, load_tokenizer
    try:
        tok = load_tokenizer(resolve_model(name))
        if name in SHIPPED:
            return first_tokens(tok, name, n)
    except (TokenizerError, DataError):
        pass
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, n).tolist()


def main() -> None:
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # as every CryptoGen process does (cryptogen/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a shipped model name or a checkpoint folder")
    ap.add_argument("--context", type=int, default=511, help="P: cached positions before the first decode step")
    ap.add_argument("--tokens", type=int, default=2, help="secure decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill", action="store_true",
                    help="a real secure prefill of the --context tokens instead of filling the caches")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="with --prefill: passes of this many tokens (bounds the 2PC's memory; 0: one pass)")
    ap.add_argument("--out", help="also write the report to this JSON file")
    a = ap.parse_args()

    from cryptogen.bench import dealer_ahead
    from cryptogen.driver import Driver
    from cryptogen.model import GPT, CheckpointError
    from cryptogen.plan import make_plan
    from cryptogen.registry import ModelNotFound, resolve_model
    from cryptogen.scheduler.inprocess import InProcessRunner, plaintext_kv

    try:
        model = GPT.from_pretrained(resolve_model(a.model))
    except (ModelNotFound, CheckpointError) as e:
        ap.error(str(e))
    cfg = model.config
    if a.prefill_chunk < 0 or (a.prefill_chunk and not a.prefill):
        ap.error("--prefill-chunk takes a positive number of tokens, with --prefill")
    if not 1 <= a.context or a.context + a.tokens > cfg.n_positions or a.tokens < 1:
        ap.error(f"--context {a.context} + --tokens {a.tokens} must fit the model's {cfg.n_positions} positions "
                 "(context >= 1, tokens >= 1)")
    ids = token_ids(a.model, model, a.context + 1, a.seed)
    prefix = ids[:a.context] if a.prefill else ids  # with --prefill the first token after the prompt is sampled
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    t0 = time.perf_counter()
    runner = InProcessRunner(model, plan, prefix)
    setup_s = time.perf_counter() - t0
    ref = GPT.from_pretrained(resolve_model(a.model)).double().eval()  # float64 reference (separate copy)
    driver, steps, ahead = Driver(runner, cfg, plan), [], dealer_ahead(runner)
    t0 = time.perf_counter()
    if a.prefill:
        steps.append(round(driver.prefill(a.context, a.prefill_chunk or None).seconds, 1))
        print(f"[long_context_decode_error] secure prefill of {a.context} tokens in {steps[-1]:.0f} s "
              f"(setup {setup_s:.0f} s)", file=sys.stderr, flush=True)
    else:
        runner.fill_caches(plaintext_kv(ref, ids[:a.context]), a.seed)
        print(f"[long_context_decode_error] caches of {a.context} positions filled in {time.perf_counter() - t0:.0f} s "
              f"(setup {setup_s:.0f} s)", file=sys.stderr, flush=True)
    ahead(None)
    for i in range(a.tokens):  # the first step makes its correlated randomness inside it, later ones before it
        dealer_s = ahead(a.context + i - 1) if i else None
        timing = driver.decode_one_token(a.context + i)
        steps.append(round(timing.seconds, 1))
        print(f"[long_context_decode_error] step at position {timing.position}: {timing.seconds:.1f} s"
              + (f" (the dealer before it: {dealer_s:.1f} s)" if dealer_s is not None else
                 " (its dealer work inside)"), file=sys.stderr, flush=True)
    secure_tokens = runner.client.tokens[len(prefix):]
    with torch.no_grad():
        full = ref(torch.tensor([prefix + secure_tokens[:-1]]))[0][0].numpy()  # float64 on the same tokens
    plain_tokens = list(ref.generate(prefix, len(secure_tokens), lambda lg: int(np.argmax(lg))))
    rows, first = [], len(prefix) - 1
    for i, lg in enumerate(runner.client.logit_history):
        pos, srt = first + i, np.sort(full[first + i])
        rows.append(dict(position=pos, context=pos + 1, phase="prefill" if a.prefill and i == 0 else "decode",
                         max_error=round(float(np.abs(lg - full[pos]).max()), 4),
                         top2_margin=round(float(srt[-1] - srt[-2]), 4),
                         same_argmax=bool(lg.argmax() == full[pos].argmax()), seconds=steps[i]))
    report = dict(model=a.model, config=dict(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                             vocab_size=cfg.vocab_size),
                  cached_positions=a.context, caches="secure prefill" if a.prefill else "filled from float64",
                  same_greedy=plain_tokens == secure_tokens,
                  max_error=max(r["max_error"] for r in rows), steps=rows,
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M"))
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
