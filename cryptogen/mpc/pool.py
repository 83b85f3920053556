"""Correlated randomness made ahead of demand on a dedicated offline link (client-led pools).

Offline/online split (the preprocessing model of SPDZ, Damgård–Pastro–Smart–Zakarias 2012, with
the pools of MP-SPDZ's ``--preprocessing`` mode): each party's ``PooledSource`` owns one end of a
second link between the same client and worker (``Channel``; TLS in deployment, ``channel_pair``
in tests) and a background *producer* thread that runs a ``maker`` (the HE protocols of
``provider_he.py``) over it. The online protocols only take from the pools.

1. Setup: the producers run ``maker.setup`` (the client sends its HE public context).
2. Client-led batches: the CLIENT's producer decides every batch — kind, count, matrix key —
   and sends the header ``[kind, count, m, k, n]``; the server's producer follows. Both push the
   batch into their pools in the same order, so the pools stay aligned whatever the timing
   (timing only decides *when* the client asks, never *what* the server makes differently).
   Idle clients send a ``PING`` header every ``ping_every`` s (the server's receive never idles
   out); ``close()`` sends ``STOP``.
3. Online ``_take`` holds the pool's condition; if the pool is short, the client's consumer
   registers a *need* (served before anything else) and both consumers wait until the batch
   lands. Waits are bounded: a producer failure wakes them at once, and no progress for
   ``stall_timeout`` s raises ``ProviderError``.
4. Look-ahead policy (client): for every (kind, key) seen or hinted, target = ``lookahead`` x
   est, clamped to [one batch, ``max_pool_bytes`` / item size], where est = the largest of the
   hinted per-token demand (``per_token`` / ``expect``), the largest consumption between two
   ``mark()`` calls over the last 4 marks (call ``mark()`` once per token), and the consumption
   since the last mark (without marks: since the start, i.e. one request). The producer refills
   the kind furthest below its target after every take and idles at the targets. ``preprocess``
   adds a one-off fill level and blocks until both pools hold it. ``lookahead=0``: no
   background refills (needs and ``preprocess`` only).
5. Failure/close: any error in a producer is recorded (type and, for cryptogen's own errors,
   their message: they never hold values), the offline link is closed so the peer's producer
   fails too, and the next take on either side raises ``ProviderError``. ``close()`` stops the
   producer within one flight of ciphertexts (it interrupts a pending receive).
Who learns what: nothing beyond the maker's protocols; headers carry public sizes only.
Cost: the maker's; accounting per source — offline wall/CPU seconds (producer thread), offline
bytes (the offline link counts everything as phase ``offline``), ``wait_s`` (online time spent
blocked on a short pool).
"""
from __future__ import annotations

import threading
import math
import time
from collections import Counter, defaultdict, deque

import numpy as np

from .channel import _CLOSED, InMemoryChannel
from .errors import ChannelError, ProviderError
from .provider import Source

MAX_MSG = 16 << 20  # deployment frame cap on the offline link: larger payloads are chunked
CODES = {"triple": 1, "bits": 2, "matrix": 3}
STOP, PING = 0, 9
MAX_ITEMS = 1 << 24  # a header asking for more items per batch is refused
MAX_MATRIX_DIM = 1 << 16
MAX_SERVER_POOL_BYTES = 2 << 30  # the server follows the client's batches, up to this much unconsumed


class Stopped(Exception):
    """The producer was asked to stop in the middle of a batch."""


def send_blob(chan, data: bytes, max_msg: int = MAX_MSG) -> None:
    arr = np.frombuffer(data, np.uint8)
    parts = max(1, -(-len(arr) // max_msg))
    chan.send(np.array([parts, len(arr)], np.int64))
    for i in range(parts):
        chan.send(arr[i * max_msg:(i + 1) * max_msg])


def recv_blob(chan, limit: int = 1 << 30, max_msg: int = MAX_MSG) -> bytes:
    parts, total = (int(v) for v in chan.recv(shape=(2,), dtype=np.int64))
    if not 0 <= total <= limit or parts != max(1, -(-total // max_msg)):
        raise ProviderError("malformed blob header on the offline link")
    data = b"".join(chan.recv(dtype=np.uint8).tobytes() for _ in range(parts))
    if len(data) != total:
        raise ProviderError("truncated blob on the offline link")
    return data


def interrupt(chan) -> None:
    """Make a receive blocked on ``chan`` (in another thread) fail now, and tell the peer."""
    abort = getattr(chan, "abort", None)
    if callable(abort):  # TLSChannel: drops the link, both ends' receives fail at once
        abort()
        return
    chan.close()
    if isinstance(chan, InMemoryChannel):  # wake our own receive (in-process pair)
        chan._inbox.put(_CLOSED)


def describe(exc: BaseException) -> str:
    """Type name, plus the message of cryptogen's own errors (written never to hold values)."""
    if type(exc).__module__.startswith("cryptogen."):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


class PooledSource(Source):
    """One party's pools, filled by a background producer over the offline link ``chan``."""

    def __init__(self, role: str, t: int, chan, maker, *, name: str = "he", lookahead: float = 2,
                 per_token: dict | None = None, max_pool_bytes: int = 1 << 30, stall_timeout: float = 300.0,
                 ping_every: float | None = None, max_batch: dict | None = None):
        super().__init__(role, t)
        self.name, self.chan, self.maker = name, chan, maker
        self.lookahead, self.max_pool_bytes, self.stall_timeout = lookahead, max_pool_bytes, stall_timeout
        self.ping_every = ping_every or min(30.0, getattr(chan, "timeout", 120.0) / 4)
        n = maker.N
        self.batch = {"triple": (n, 16 * n), "bits": (n, n), "matrix": (1, 16 * n)}
        self.batch.update(max_batch or {})
        self._cv = threading.Condition()
        self._hint: dict = {}
        self._need: dict = {}
        self._fill: dict = {}
        self._since_mark: Counter = Counter()
        self._recent: dict = defaultdict(lambda: deque(maxlen=4))
        self._error: str | None = None
        self._closing = self._exited = False
        self._progress = time.monotonic()
        self.offline = dict(setup_s=0.0, wall_s=0.0, cpu_s=0.0, batches=0)
        self.wait_s = 0.0
        if per_token:
            self.expect(per_token)
        self._thread = threading.Thread(target=self._main, name=f"cryptogen-cr-{role}", daemon=True)
        self._thread.start()

    # -- public control --------------------------------------------------------------------
    def expect(self, per_token: dict) -> None:
        """Hint the demand of one token: {"triple": n, "bits": n, ("matrix", (m, k, n)): c}."""
        with self._cv:
            for k, v in per_token.items():
                self._hint[_key(k)] = int(v)
            self._cv.notify_all()

    def mark(self) -> None:
        """A token boundary (client side drives the policy; harmless on the server)."""
        with self._cv:
            for k, v in self._since_mark.items():
                self._recent[k].append(v)
            self._since_mark.clear()
            self._cv.notify_all()

    def preprocess(self, triples: int = 0, bits: int = 0, matrix: dict | None = None, wait: bool = True,
                   tbits: int = 0) -> None:
        """Make both pools hold at least this many items (both parties call it); blocks if ``wait``.
        ``tbits`` (a dealer's truncation keys) must be 0: these pools make no DCF keys."""
        if tbits:
            raise ProviderError(f"the {self.name} provider makes no DCF keys (tbits)")
        wants = {("triple", None): triples, ("bits", None): bits}
        wants.update({("matrix", tuple(int(v) for v in k)): n for k, n in (matrix or {}).items()})
        wants = {k: int(n) for k, n in wants.items() if n > 0}
        with self._cv:
            if self.role == "client":
                for k, n in wants.items():
                    self._fill[k] = max(self._fill.get(k, 0), n)
                self._cv.notify_all()
            if wait:
                self._wait_until(lambda: all(self._pool(*k).size >= n for k, n in wants.items()))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the producer (within one flight) and the link; later takes raise ProviderError."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self.role == "client":
            self._thread.join(0.2)  # an idle client says STOP itself
        if self._thread.is_alive():
            interrupt(self.chan)
        self._thread.join(timeout)

    def counters(self) -> dict:
        with self._cv:
            st = self.chan.stats["offline"].as_dict()
            return dict(super().counters(), consumed_offline={}, wait_s=self.wait_s,
                        offline=dict(self.offline, **st), pool={f"{k}{'' if key is None else key}": p.size
                                                               for (k, key), p in self.pools.items()})

    # -- online consumption ----------------------------------------------------------------
    def _take(self, kind, count, key=None):
        k = (kind, key)
        with self._cv:
            self._check()
            pool = self._pool(kind, key)
            self._since_mark[k] += count
            if pool.size < count:
                t0 = time.monotonic()
                if self.role == "client":
                    self._need[k] = count
                    self._cv.notify_all()
                self._wait_until(lambda: pool.size >= count)
                self._need.pop(k, None)
                self.wait_s += time.monotonic() - t0
            self.consumed[kind] += count
            out = pool.take(count)
            self._cv.notify_all()  # the producer re-checks its targets
            return out

    def _check(self) -> None:
        if self._error is not None:
            raise ProviderError(self._error)
        if self._closing:
            raise ProviderError("the correlated-randomness source is closed")

    def _wait_until(self, ready, timeout: float | None = None) -> None:
        start = time.monotonic()
        while not ready():
            self._check()
            if self._exited:
                raise ProviderError(f"the correlated-randomness producer ({self.role}) has stopped")
            now = time.monotonic()
            if now - max(self._progress, start) > self.stall_timeout or (timeout and now - start > timeout):
                raise ProviderError(f"no correlated randomness produced for {self.stall_timeout:.0f} s "
                                    f"({self.role}); the offline link may be stuck")
            self._cv.wait(1.0)

    # -- producer thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with self.chan.phase("offline"):
                w0, c0 = time.perf_counter(), time.thread_time()
                self.maker.setup(self.chan)
                self.offline["setup_s"] = time.perf_counter() - w0
                self.offline["cpu_s"] += time.thread_time() - c0
                (self._client_loop if self.role == "client" else self._server_loop)()
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - recorded, surfaced on the next take
            if not (self._closing and isinstance(e, ChannelError)):
                peer = isinstance(e, ChannelError)
                msg = (f"correlated-randomness producer ({self.role}) stopped: the offline link failed or the peer "
                       f"closed it ({describe(e)})" if peer else
                       f"correlated-randomness producer ({self.role}) failed: {describe(e)}")
                with self._cv:
                    self._error = msg
        finally:
            with self._cv:
                self._exited = True
                self._cv.notify_all()
            try:
                self.chan.close()  # the peer's producer stops too
            except Exception:  # noqa: BLE001 - best effort on a broken link
                pass

    def _header(self, code: int, count: int = 0, key=None) -> None:
        self.chan.send(np.array([code, count, *(key or (0, 0, 0))], np.int64))

    def _client_loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._cv:
                job = None
                while not self._closing:
                    job = self._decide()
                    left = self.ping_every - (time.monotonic() - last)
                    if job is not None or left <= 0:
                        break
                    self._cv.wait(left)
                closing = self._closing
            last = time.monotonic()
            if closing:
                self._header(STOP)
                return
            if job is None:
                self._header(PING)
                continue
            kind, count, key = job
            self._header(CODES[kind], count, key)
            self._batch(kind, count, key)

    def _server_loop(self) -> None:
        kinds = {v: k for k, v in CODES.items()}
        while True:
            h = [int(v) for v in self.chan.recv(shape=(5,), dtype=np.int64)]
            if h[0] == STOP:
                return
            if h[0] == PING:
                continue
            kind, count = kinds.get(h[0]), h[1]
            key = tuple(h[2:]) if kind == "matrix" else None
            if key and not all(1 <= d <= MAX_MATRIX_DIM for d in key):
                raise ProviderError("malformed batch header on the offline link (matrix dimensions)")
            size = count * (math.prod(key) if key else 1)  # Python ints: no wrap-around
            if kind is None or not 0 < size <= MAX_ITEMS:
                raise ProviderError("malformed batch header on the offline link")
            with self._cv:
                held = sum(p.size * self._item_bytes(k) for k, p in self.pools.items())
            if held > MAX_SERVER_POOL_BYTES:
                raise ProviderError(f"the client asked for more than {MAX_SERVER_POOL_BYTES >> 20} MiB of unconsumed "
                                    "correlated randomness")
            self._batch(kind, count, key)

    def _batch(self, kind: str, count: int, key) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        arrays = self.maker.make(self.chan, kind, count, key, stop=lambda: self._closing)
        with self._cv:
            self._push(kind, arrays, key)
            self.offline["wall_s"] += time.perf_counter() - w0
            self.offline["cpu_s"] += time.thread_time() - c0
            self.offline["batches"] += 1
            self._progress = time.monotonic()
            self._cv.notify_all()

    # -- client policy (caller holds the lock) ---------------------------------------------
    def _decide(self):
        for k, need in self._need.items():
            if self._pool(*k).size < need:
                return self._job(k, need - self._pool(*k).size)
        for k, level in list(self._fill.items()):
            if self._pool(*k).size < level:
                return self._job(k, level - self._pool(*k).size)
            del self._fill[k]
        best, worst = None, 0.0
        for k in set(self.pools) | set(self._hint):
            target = self.target(k)
            short = target - self._pool(*k).size
            if short > 0 and short / target > worst:
                best, worst = k, short / target
        return None if best is None else self._job(best, target=True)

    def target(self, k) -> int:
        """Look-ahead level of (kind, key) (see the module doc, step 4)."""
        if self.lookahead <= 0:
            return 0
        est = max(self._hint.get(k, 0), max(self._recent[k], default=0), self._since_mark[k])
        lo = self.batch[k[0]][0]
        return int(min(max(self.lookahead * est, lo), max(lo, self.max_pool_bytes // self._item_bytes(k))))

    def _job(self, k, short: int = 0, target: bool = False):
        kind, key = k
        if target:
            short = self.target(k) - self._pool(*k).size
        lo, hi = self.batch[kind]
        if kind == "matrix":
            per = int(np.prod(key))
            return kind, int(min(max(short, 1), max(1, hi // per))), key
        if kind == "bits":  # a few candidates are rejected: ask for a little more
            short += short // 1000 + 8
        return kind, int(min(max(-(-short // lo) * lo, lo), hi)), key

    def _item_bytes(self, k) -> int:
        kind, key = k
        if kind == "matrix":
            m, kk, n = key
            return 8 * (m * kk + kk * n + m * n)
        return 24 if kind == "triple" else 8 * (self.L + 1)


def _key(k):
    if isinstance(k, str):
        return (k, None)
    kind, key = k
    return (kind, None if key is None else tuple(int(v) for v in key))
