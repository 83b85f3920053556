"""cryptogen/memory.py: with the default mode a freed array's memory is reused by the next array of
that size without page faults; ``CRYPTOGEN_MEMORY=system`` leaves glibc's and numpy's defaults; a bad
value is one line. Each case runs in a fresh interpreter (the settings are process-wide)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# faults while making a 64 MiB array after an array of that size was freed, in the main thread and
# then in another thread (which glibc would give an arena of its own; numpy's huge-page advice,
# returned by setting it again, is printed first)
CHILD = """
import resource, sys, threading
import numpy as np
from cryptogen.memory import keep_freed_memory
keep_freed_memory()
advice = np._core.multiarray._set_madvise_hugepage(False)
def remake(out):
    a = np.ones(8 << 20); del a
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    b = np.ones(8 << 20)
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
faults = []
remake(faults)
t = threading.Thread(target=remake, args=(faults,)); t.start(); t.join()
print(int(advice), *faults)
"""

# the same for a block over 2 GiB (glibc trims a freed heap top above its trim threshold; mallopt takes
# an int, so only -1, read as SIZE_MAX, keeps such a block): one byte per 4 KiB page is touched
BIG_CHILD = """
import resource
import numpy as np
from cryptogen.memory import keep_freed_memory
keep_freed_memory()
size = 5 << 29  # 2.5 GiB
a = np.empty(size, np.uint8); a[::4096] = 1; del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.empty(size, np.uint8); b[::4096] = 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(code: list[str], env_mode: str | None):
    env = {k: v for k, v in os.environ.items() if k not in ("CRYPTOGEN_MEMORY", "GLIBC_TUNABLES",
                                                           "NUMPY_MADVISE_HUGEPAGE")}
    if env_mode is not None:
        env["CRYPTOGEN_MEMORY"] = env_mode
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and Linux page faults")
def test_kept_memory_is_reused_without_page_faults():
    # 64 MiB is 16,384 pages of 4 KiB or 32 huge pages: either way >= 32 faults when it is faulted in anew
    keep = _run(["-c", CHILD], None)
    assert keep.returncode == 0, keep.stderr
    advice, main, thread = map(int, keep.stdout.split())
    assert advice == 0 and main < 32 and thread < 32, keep.stdout
    system = _run(["-c", CHILD], "system")
    assert system.returncode == 0, system.stderr
    advice, main, thread = map(int, system.stdout.split())
    assert advice == 1 and main >= 32 and thread >= 32, system.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and Linux page faults")
def test_kept_memory_holds_blocks_over_2_gib():
    kept = _run(["-c", BIG_CHILD], None)
    assert kept.returncode == 0, kept.stderr
    assert int(kept.stdout) < 32, kept.stdout  # 655,360 pages of 4 KiB if the heap's top was given back


def test_bad_memory_mode_is_one_line_and_starts_nothing(tmp_path):
    out = tmp_path / "never"
    r = _run(["-m", "cryptogen.cli", "init", "--shape", "gpt2", "--layers", "1", "--out", str(out)], "huge")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: CRYPTOGEN_MEMORY='huge' is not a memory mode; use one of keep, system (or unset it: keep)"]
    assert "Traceback" not in r.stderr and not out.exists()
