"""Where a secure decode step's time goes: both parties in one process (no Ray, one worker), a
prefill of --context tokens, one unsampled decode step (it measures a step's demand of correlated
randomness), then --tokens decode steps sampled by py-spy (a sampling profiler that sees every thread;
``ray[default]`` installs it), and the samples put into buckets by what the work is for (the innermost
bucket on each stack wins: a truncation inside LayerNorm counts as truncation). Before each sampled step the
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

# (bucket, who runs it, the functions that mark it on a stack) by what the work is for. A mark matches a
# frame whose qualified name has it as a part ("dot_ct_pt" marks "ServerEngine.dot_ct_pt.<locals>.part"),
# so the work an HE thread runs (he/threads.py: its stack starts at the pool, not at the caller) is
# still found. The innermost marked frame wins: a truncation inside LayerNorm counts as truncation.
BUCKETS = [
    ("HE attention: q.K and p.V cross terms (ct x pt in the NTT domain, the step's fresh forms)", "server",
     ("_qk_row", "_pv_row", "qk_decode", "pv_decode", "dot_ct_pt")),
    ("HE linear layers, embedding, LM head (hoisted baby rotations, multiply-accumulate, giant sums)",
     "server", ("rotate_many", "rotations_ntt", "_giant_sum_stacked", "giant_sum", "giants_hoisted",
                "giant_words", "_apply", "_babies", "matmul_blocked", "matmul_ct_pt_decode")),
    ("HE export: Enc(0), re-randomise and flood, switch down, pack (H2S)", "server",
     ("export", "h2s_server", "_h2s_send", "_make_enc_zero", "enc_zero", "_flood")),
    ("HE encrypt: S2H uploads, KV appends", "client", ("encrypt_to_bytes", "encrypt_public", "s2h_send")),
    ("HE decrypt: H2S downloads", "client", ("decrypt", "decrypt_bytes", "h2s_receive", "SwitchedDecryptor")),
    ("attention: the client's own terms q_c.k_c and p_c.v_c, in the clear", "client", ("local_scores", "local_pv")),
    ("DCF key generation", "dealer", ("gen", "make")),
    ("the dealer's items taken from the pools", "both", ("_take",)),
    ("2PC truncation (DCF evaluation)", "both", ("trunc", "trunc_many")),
    ("2PC comparison (DReLU)", "both", ("drelu", "ge_const")),
    ("2PC softmax", "both", ("softmax", "softmax_heads")),
    ("2PC GELU", "both", ("gelu",)),
    ("2PC LayerNorm", "both", ("layernorm",)),
]
WAITING = "waiting: for the other party, a channel, or a thread's task"
# the innermost frame of a thread that waits; an HE thread with no task sits in the pool's ``_worker``
# and is left out (it is no party's work)
IDLE_LEAVES = ("wait", "_wait_for_tstate_lock", "acquire", "_recv_raw", "_run_threads", "_fan_out")
NO_TASK = "_worker"


def _parts(frame: str) -> list[str]:
    return frame.split(" (")[0].split(".")


def bucket_of(frames: list[str]) -> str:
    """The bucket of one py-spy stack (outermost frame first)."""
    if frames and _parts(frames[-1])[-1] == NO_TASK:
        return NO_TASK
    if frames and any(p in IDLE_LEAVES for p in _parts(frames[-1])):
        return WAITING
    for frame in reversed(frames):  # innermost first
        parts = _parts(frame)
        for label, _, marks in BUCKETS:
            if any(m in parts for m in marks):
                return label
    return "other (numpy glue, framing, Python)"


def bucket_counts(raw: Path) -> tuple[Counter, int, int]:
    """Samples per bucket in the decode steps, the samples of HE threads with no task, and the samples
    of the dealer making the next step's items between the steps (both left out of the buckets)."""
    counts, no_task, offline = Counter(), 0, 0
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if any(_parts(f)[-1] == "preprocess" for f in frames):
            offline += int(n)  # the dealer making the next step's items between steps
            continue
        label = bucket_of(frames)
        if label == NO_TASK:
            no_task += int(n)
        else:
            counts[label] += int(n)
    return counts, no_task, offline


def report(raw: Path) -> None:
    counts, no_task, offline = bucket_counts(raw)
    total = sum(counts.values())
    who = {label: w for label, w, _ in BUCKETS} | {WAITING: "both"}
    print(f"\n{total} samples over all threads in the decode steps (left out: {no_task} of HE threads with no "
          f"task, {offline} of the dealer making the items before the steps)\n\n| share | who | bucket |\n|---:|---|---|")
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
