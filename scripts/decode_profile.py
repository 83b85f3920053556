"""Where a secure decode step's time goes: both parties in one process (no Ray, one worker), a
prefill of --context tokens, one unsampled decode step (it measures a step's demand of correlated
randomness), then --tokens decode steps sampled by py-spy (a sampling profiler that sees every thread;
``ray[default]`` installs it), and the samples put into the kernels' buckets (the innermost bucket on
each stack wins: a truncation inside LayerNorm counts as truncation). Before each sampled step the
dealer makes that step's items (offline, as the bench and the deployed client do); those samples are
counted apart, not in the table.

    .venv/bin/python scripts/decode_profile.py --model wikitext2 --context 16 --tokens 4
    .venv/bin/python scripts/decode_profile.py --model /tmp/g2full --context 127 --tokens 2 --fill

``--raw FILE`` only re-buckets a py-spy raw file. In one process the client's half runs beside the
server's: the table gives each party's share of the CPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (bucket, who runs it, function names that mark it on a stack, and, if not empty, the outer functions
# one of which must be below that frame), innermost match first
BUCKETS = [
    ("HE rotations: linear layers (baby and giant steps; the folds are summed in shares)", "server",
     ("rotate",), ("_apply", "_babies", "matmul_blocked")),
    ("HE encode: batched prefill's diagonals (per call)", "server", ("encode", "ntt_terms", "diagonals"),
     ("matmul_blocked",)),
    ("HE attention: q.K and p.V cross terms (ct x pt, NTT domain)", "server", ("_qk_row", "_pv_row"), ()),
    ("attention: the client's own terms q_c.k_c and p_c.v_c, in the clear", "client",
     ("local_scores", "local_pv"), ()),
    ("HE ct x ct (not on the attention path since the ct x pt attention)", "server",
     ("mul_ct_ct", "mul_ct_ct_many", "dot_ct_ct"), ()),
    ("HE ct x pt, ntt kernel: NTTs, words in and out of Pyfhel, multiply-accumulate", "server",
     ("babies_ntt", "giant_ntt"), ()),
    ("HE ct x pt: linear layers, embedding, LM head", "server", ("matmul_ct_pt_decode", "_apply", "matmul_blocked"), ()),
    ("HE export: re-randomise and flood, then H2S", "server", ("export", "h2s_server"), ()),
    ("HE encrypt: S2H uploads, KV appends", "client", ("encrypt_to_bytes", "encrypt_public", "s2h_send"), ()),
    ("HE decrypt: H2S downloads", "client", ("decrypt",), ()),
    ("DCF key generation", "dealer", ("gen", "make"), ()),
    ("2PC truncation (DCF evaluation)", "both", ("trunc", "trunc_many"), ()),
    ("2PC comparison (DReLU)", "both", ("drelu", "ge_const"), ()),
    ("2PC softmax", "both", ("softmax", "softmax_heads"), ()),
    ("2PC GELU", "both", ("gelu",), ()),
    ("2PC LayerNorm", "both", ("layernorm",), ()),
    ("waiting for the other party", "both", ("wait", "_wait_for_tstate_lock", "acquire"), ()),
]


def bucket_of(frames: list[str]) -> str:
    names = [f.split(" (")[0].rsplit(".", 1)[-1] for f in frames]  # outermost first
    for i in range(len(names) - 1, -1, -1):  # leaf first
        for label, _, marks, under in BUCKETS:
            if names[i] in marks and (not under or any(n in under for n in names[:i])):
                return label
    return "other (numpy glue, framing, Python)"


def report(raw: Path) -> None:
    counts, total, offline = Counter(), 0, 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if any(f.split(" (")[0].rsplit(".", 1)[-1] == "preprocess" for f in frames):
            offline += int(n)  # the dealer making the next step's items between steps
            continue
        counts[bucket_of(frames)] += int(n)
        total += int(n)
    who = {label: w for label, w, _, _ in BUCKETS}
    print(f"\n{total} samples over all threads in the decode steps ({offline} more, left out, in the dealer's "
          f"making of their items before them)\n\n| share | who | bucket |\n|---:|---|---|")
    for label, n in counts.most_common():
        print(f"| {100 * n / total:.1f} % | {who.get(label, '')} | {label} |")


def run(a) -> None:
    from cryptogen.bench import dealer_ahead
    from cryptogen.driver import Driver
    from cryptogen.model import GPT
    from cryptogen.plan import make_plan
    from cryptogen.registry import resolve_model
    from cryptogen.scheduler.inprocess import InProcessRunner, plaintext_kv

    model = GPT.from_pretrained(resolve_model(a.model)).eval()
    cfg = model.config
    prompt = [(7 + 31 * i) % cfg.vocab_size for i in range(a.context + a.fill)]  # --fill: the first decode's token too
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    runner = InProcessRunner(model, plan, prompt)
    prompt = prompt[:a.context]
    driver = Driver(runner, cfg, plan, "kv-reuse")
    t0 = time.perf_counter()
    if a.fill:  # the caches from the plaintext model (a GPT-2 base prefill is hours here)
        runner.fill_caches(plaintext_kv(model, prompt))
        print(f"[caches of {len(prompt)} positions filled from the plaintext model: {time.perf_counter() - t0:.1f} s]",
              flush=True)
    else:
        driver.forward(0, len(prompt), "last")
        print(f"[prefill of {len(prompt)} tokens: {time.perf_counter() - t0:.1f} s]", flush=True)
    ahead = dealer_ahead(runner)
    ahead(None)
    driver.forward(len(prompt), 1, "last")  # unsampled: measures one decode step's demand for the dealer
    print("[decode]", flush=True)  # the parent starts sampling here
    times, made = [], []
    for i in range(a.tokens):
        made.append(ahead(len(prompt) + i))  # the dealer makes the step's items before it (offline, as in deployment)
        t0 = time.perf_counter()
        driver.forward(len(prompt) + 1 + i, 1, "last")
        times.append(time.perf_counter() - t0)
    print(f"[decode steps: {', '.join(f'{t:.2f}' for t in times)} s; mean {sum(times) / len(times):.2f} s; "
          f"the dealer before each, offline: mean {sum(made) / len(made):.2f} s]", flush=True)


def main() -> None:
    from cryptogen.memory import keep_freed_memory

    keep_freed_memory()  # as every CryptoGen process does (cryptogen/memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wikitext2", help="a shipped model's name or a checkpoint folder")
    ap.add_argument("--context", type=int, default=16, help="prompt tokens before the decode steps")
    ap.add_argument("--tokens", type=int, default=4, help="decode steps sampled")
    ap.add_argument("--fill", action="store_true",
                    help="fill the encrypted caches from the plaintext model instead of a secure prefill "
                         "(InProcessRunner.fill_caches; for GPT-2 base, whose prefill is hours here)")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--raw", type=Path, help="only bucket this py-spy raw file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw:
        if not a.raw.is_file():
            sys.exit(f"error: no py-spy raw file at {a.raw}")
        return report(a.raw)
    from cryptogen.registry import ModelNotFound, resolve_model
    try:
        folder = resolve_model(a.model)
    except ModelNotFound as e:
        sys.exit(f"error: {e}")
    if not all((folder / f).is_file() for f in ("config.json", "model.safetensors")):
        sys.exit(f"error: model folder {folder} needs config.json and model.safetensors")
    if a.child:
        return run(a)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("error: py-spy not found (ray[default] installs it: run bin/bootstrap), or pass --raw FILE")
    raw = Path(f"/tmp/decode-profile-{os.getpid()}.raw")
    child = subprocess.Popen([sys.executable, __file__, "--child", "--model", a.model, "--context", str(a.context),
                              "--tokens", str(a.tokens)] + (["--fill"] if a.fill else []), stdout=subprocess.PIPE,
                             text=True)
    spy_proc = None
    for line in child.stdout:
        print(line, end="", flush=True)
        if line.startswith("[decode]") and spy_proc is None:
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(child.pid), "-r", str(a.rate), "-f", "raw",
                                         "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child.wait()
    if spy_proc is None or spy_proc.wait(60) != 0 or not raw.exists():
        sys.exit(f"error: the profile was not recorded (child rc {child.returncode})")
    print(f"[py-spy raw samples: {raw}]")
    report(raw)


if __name__ == "__main__":
    main()
