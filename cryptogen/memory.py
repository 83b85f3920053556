"""How a CryptoGen process allocates: memory it frees stays in the process, for its next array.

Why. The protocols allocate and free large numpy arrays all the time: the dealer's DCF keys (1.0-1.7
KB per comparison and party, ~1.3 GB per party per GPT-2 decode step at 511 context), the HE kernels'
NTT buffers, the frames of a step's messages. By default glibc hands a freed block of >= 128 KiB
(a threshold it raises by itself up to 32 MiB) straight back to the kernel, and numpy advises
transparent huge pages for arrays of >= 4 MiB; so the next array of that size is faulted in again
and the kernel zeroes it page by page. In a VM whose freed pages go back to the host that is far
dearer than the arithmetic: on this machine making 300,000 solved bits with DCF keys took 19-44 us
each with fresh memory (10.4 s of system time), 4.9 us with memory kept (0.3 s). Measured end to end
in docs/BENCHMARKS.md ("Freed memory kept in the process").

What. ``keep_freed_memory()`` runs at the start of every CryptoGen process (the CLI, the server's
Ray worker actors, the dealer service):
  1. glibc's ``mallopt``:
     - M_MMAP_MAX = 0: every block comes from the heap, so a freed one is reused;
     - M_TRIM_THRESHOLD = -1 (``mallopt`` takes an int; glibc reads -1 as SIZE_MAX): the heap is
       never given back. The largest int, 2^31 - 1, still gives back a freed heap top over 2 GiB,
       as a GPT-2 decode step's DCF keys at 511 context are (keys for 765,000 comparisons, three
       batches: 1.6-1.7 s of system time per batch with 2^31 - 1, 0.08 s with -1);
     - M_ARENA_MAX = 1: threads allocate from the main heap too. A thread's own arena is made of
       64 MiB heaps, so a larger block there is mmapped whatever M_MMAP_MAX says, and unmapped
       when freed (keys for 200,000 comparisons made in a thread: 0.6-0.85 s of system time per
       batch, 0.02 s with one arena);
  2. numpy's huge-page advice off (``NUMPY_MADVISE_HUGEPAGE=0`` does the same at import).
Cost: a process's resident memory stays at its high-water mark, plus the heap's fragmentation
(measured: the GPT-2 server worker's peak 14.3 -> 15.1 GB at 511 context; the tiny model's worker
holds 1.34 GB over a 40-session soak where glibc's defaults held 0.55-0.62 GB). One arena makes
threads share the heap's lock (they hold the GIL most of the time anyway) and shrank the client's
process at 511 by 0.8-1.3 GB.

``CRYPTOGEN_MEMORY=system`` keeps glibc's and numpy's defaults instead (a machine where page faults
are cheap, or a server that must give memory back between requests). Other C libraries than glibc
(musl) are left as they are. Nothing here is secret: it changes where arrays live, not what is in
them (a buffer is overwritten before it is read; numpy never hands out uninitialised memory as data).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "CRYPTOGEN_MEMORY"
MODES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_applied = False


class MemoryModeError(ValueError):
    """A bad ``CRYPTOGEN_MEMORY`` value."""


def mode(environ=None) -> str:
    """The memory mode the environment asks for (default ``keep``)."""
    value = (os.environ if environ is None else environ).get(ENV, "keep").strip().lower() or "keep"
    if value not in MODES:
        raise MemoryModeError(f"{ENV}={value!r} is not a memory mode; use one of {', '.join(MODES)} "
                              f"(or unset it: keep)")
    return value


def keep_freed_memory(environ=None) -> str:
    """Apply the mode (module doc) to this process, once; returns it. ``system`` changes nothing."""
    global _applied
    want = mode(environ)
    if want == "system" or _applied:
        return want
    if platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, -1)
        libc.mallopt(_M_ARENA_MAX, 1)
    import numpy as np

    set_advice = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if set_advice is not None:
        set_advice(False)
    _applied = True
    return want
