"""The server's HE threads: independent kernel calls of one step run on up to
``CRYPTOGEN_HE_THREADS`` threads (default min(2, cores)). The NTT kernels release the GIL
(he/_ntt.c), so two threads use both cores while the client waits (Pyfhel itself holds the GIL:
only our kernels gain). Every task writes only its own result; op counts stay in the caller."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

THREADS_ENV = "CRYPTOGEN_HE_THREADS"
T = TypeVar("T")
R = TypeVar("R")

_POOL = None
_LOCK = threading.Lock()


def count() -> int:
    raw = os.environ.get(THREADS_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else min(2, os.cpu_count() or 1)


def pool() -> ThreadPoolExecutor | None:
    """The process's HE thread pool, or None with one thread."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            n = count()
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="cryptogen-he") if n > 1 else False
        return _POOL or None


def map_tasks(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(x) for x in items], on the HE threads when there are two or more items."""
    p = pool()
    if p is None or len(items) < 2 or threading.current_thread().name.startswith("cryptogen-he"):
        return [fn(x) for x in items]
    return list(p.map(fn, items))


def halves(n: int, parts: int | None = None) -> list[range]:
    """range(n) cut into ``parts`` (default: the thread count) near-equal contiguous pieces, none empty."""
    parts = max(1, min(n, parts or count()))
    cuts = [n * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]
