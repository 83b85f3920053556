"""A user-space shaped link for benchmarks: a TCP relay on loopback that adds a one-way delay and
a rate limit to every byte it forwards (the kernel here has no ``netem`` qdisc).

    relay = ShapedRelay("127.0.0.1", server_port, *PROFILES["wan"])
    port = relay.start()   # dial 127.0.0.1:port instead of the server; TLS passes through unchanged
    ...
    relay.close()

What it models, per direction (shared by the connections it relays: one relay is one link): a
link of ``rate_bps`` bits per second (a chunk's serialization, ``bytes * 8 / rate``, starts when
the link is free and the chunk has arrived: cumulative, so a burst queues behind itself) then a
propagation delay of ``rtt_s / 2``. Each chunk is timestamped on arrival and released at its own
time, so delays overlap (pipelined), as on a real link. It accepts at most ``BACKLOG_S`` of
unserialized bytes ahead of the link, then stops reading (the sender sees TCP back-pressure, like
a full socket buffer); a slow receiver back-pressures it in turn.

What it does not model: loss, retransmission, jitter, reordering, TCP slow start or a congestion
window (a transfer runs at the full rate from its first byte), nor one link shared by several
relays (each relay, i.e. each target, has its own ``rate_bps``). Timing is one event loop's:
waits under ``_FINE`` end in a thread's ``time.sleep`` (an asyncio timer wakes up to 1 ms late),
the last ``_SPIN`` in the loop itself; a loaded machine can release a chunk late, never early.
Run relays in a process of their own when the process is busy (its threads hold the GIL).

Cost: a thread and an event loop per relay, one copy of every byte, and the waits: measured on a
shared 2-core machine, ~20% of a core at 1 Gbit/s each way, ~10% at 100 Mbit/s; the relay adds
~0.1 ms to a round trip when unshaped. Targets must be loopback addresses: the relay never
carries traffic off this machine.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PROFILES = {"lan": (0.0005, 1e9), "wan": (0.040, 100e6)}  # name -> (rtt seconds, bits per second)
BACKLOG_S = 0.05  # link time of bytes accepted but not yet serialized, per direction
_FINE = 0.002     # waits shorter than this: time.sleep in a helper thread instead of an asyncio timer
_SPIN = 0.0004    # and shorter than this: the loop spins (a thread's wake-up costs ~0.2 ms)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def _abort(writers) -> None:
    for w in writers:
        w.transport.abort()


class ShapedRelay:
    """Listens on 127.0.0.1 (``start()`` returns the port); each accepted connection is relayed
    to ``target_host:target_port`` (a loopback address) through a shaped link both ways."""

    def __init__(self, target_host: str, target_port: int, rtt_s: float, rate_bps: float):
        if not is_loopback(target_host):
            raise ValueError(f"ShapedRelay relays to loopback addresses only, not {target_host!r}")
        self.target = (target_host, int(target_port))
        self.set_shape(rtt_s, rate_bps)
        self.bytes = {"up": 0, "down": 0}  # forwarded: up = to the target, down = back to the dialler
        self._free = {"up": 0.0, "down": 0.0}  # when the link has serialized everything it accepted
        self.connections = 0
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set = set()
        self._writers: set = set()
        self._sleeper = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shaper-sleep")

    def set_shape(self, rtt_s: float, rate_bps: float) -> None:
        """(Re)shape the link, from any thread; chunks already accepted keep their release times.
        ``rate_bps`` may be ``float("inf")`` (with ``rtt_s`` 0: a plain relay)."""
        if not (rtt_s >= 0 and rate_bps > 0):
            raise ValueError("rtt_s must be >= 0 and rate_bps > 0")
        self.chunk = int(min(256 << 10, max(16 << 10, rate_bps / 8 * 0.004)))
        self.delay, self.rate = rtt_s / 2, float(rate_bps)

    # ---- lifecycle (from any thread) ------------------------------------------------------------
    def start(self) -> int:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shaped-relay", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._on_connect, "127.0.0.1", 0, limit=4 * self.chunk))
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        """Stop listening and drop every relayed connection now."""
        if self._loop is None:
            return

        async def shut():
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self._call(shut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
            self._loop = None
            self._sleeper.shutdown(wait=False)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- on the relay's loop ----------------------------------------------------------------------
    async def _on_connect(self, creader, cwriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            try:
                treader, twriter = await asyncio.open_connection(*self.target, limit=4 * self.chunk)
            except OSError:
                cwriter.transport.abort()
                return
            self.connections += 1
            both = (cwriter, twriter)
            self._writers.update(both)
            await asyncio.gather(self._pipe(creader, twriter, "up", both), self._pipe(treader, cwriter, "down", both))
            for w in both:
                w.close()
            self._writers.difference_update(both)
        except asyncio.CancelledError:
            pass  # close(): the connection is dropped (no re-raise: asyncio would log it as an error)
        finally:
            self._tasks.discard(task)

    async def _pipe(self, src, dst, name: str, both) -> None:
        """One direction: read, stamp each chunk with its release time, hand it to the deliverer."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        deliver = loop.create_task(self._deliver(q, dst, name))
        deliver.add_done_callback(lambda t: t.cancelled() or t.exception() is None or _abort(both))
        try:
            while True:
                ahead = self._free[name] - loop.time() - BACKLOG_S
                if ahead > 0:
                    await asyncio.sleep(ahead)  # back-pressure: stop reading the sender
                data = await src.read(self.chunk)
                free = self._free[name] = max(self._free[name], loop.time()) + len(data) * 8 / self.rate
                q.put_nowait((free + self.delay, data))
                if not data:  # EOF: forwarded (after the bytes before it) as a half-close
                    break
            await deliver
        except asyncio.CancelledError:
            deliver.cancel()
            raise
        except Exception:  # noqa: BLE001 - a reset on either side drops the whole connection
            deliver.cancel()
            _abort(both)

    async def _deliver(self, q: asyncio.Queue, dst, name: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            at, data = await q.get()
            wait = at - loop.time()
            if wait > _FINE:
                await asyncio.sleep(wait - _FINE)
                wait = at - loop.time()
            if wait > _SPIN:
                await loop.run_in_executor(self._sleeper, time.sleep, wait - _SPIN / 2)
            while loop.time() < at:  # the last few hundred us: yield to the loop until due
                await asyncio.sleep(0)
            if not data:
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
                return
            dst.write(data)
            self.bytes[name] += len(data)
            await dst.drain()
