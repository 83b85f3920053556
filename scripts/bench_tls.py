"""Throughput and CPU of one TLS link (``cryptogen.net.channel``) between two processes on loopback.

The sender sends ``--mib`` MiB in frames of each ``--frame-kib`` size; the receiver takes them. Two
comparisons, each alternated in one run so the ratio is measured side by side:

- ``--compare writes``: the channel's writes as they are (pieces of ``WRITE_CHUNK``, each drained
  first) against as they were before (every frame handed to asyncio's SSL transport at once);
- ``--compare reads``: the channel's receiving as it is (``frames.FrameReceiver``: TLS decrypts
  straight into each frame's array) against as it was before (``read_frame`` over an
  ``asyncio.StreamReader``). With ``--busy py``, a thread in the receiving process runs a Python
  loop, as a worker's protocol code does between kernels; with ``--busy c``, C code that holds the
  GIL (``sum(range(200_000))``, about 2 ms a call), as Pyfhel's calls do. The GIL's switch interval
  is the channel's (``CRYPTOGEN_SWITCH_INTERVAL_US``).

CPU seconds are each process's own (user + system), the busy thread's included.

    .venv/bin/python scripts/bench_tls.py --mib 400 --frame-kib 64 1024 8192 --out docs/bench/tls_write_chunks.json
    .venv/bin/python scripts/bench_tls.py --compare reads --busy py --mib 200 --frame-kib 64 1024 8192 \\
        --out docs/bench/tls_reads_busy.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import threading
import time

import numpy as np

from cryptogen.net import channel
from cryptogen.net.tls import ensure_certificate, fingerprint, server_context


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _write_at_once(writer, data, timeout=None) -> None:
    """The channel's writes before: the whole frame to the transport, no drain."""
    writer.write(data)


_NOW = (channel.write_chunked, channel.tune_writes)


def _mode(before: bool) -> None:
    channel.write_chunked, channel.tune_writes = (_write_at_once, lambda writer: None) if before else _NOW


def _busy(stop: threading.Event, kind: str) -> None:
    while not stop.is_set():
        if kind == "c":
            sum(range(200_000))  # one C call holding the GIL for about 2 ms
        else:
            x = 0
            for i in range(10_000):
                x += i


async def _stream_frames(reader, frames: int, nbytes: int) -> None:
    """The channel's receiving before ``FrameReceiver``: one ``read_frame`` per frame."""
    await channel.read_frame(reader, nbytes + 4096)  # the sender's start mark
    for _ in range(frames):
        await channel.read_frame(reader, nbytes + 4096)


def _receiver(q, cert: str, key: str, frames: int, nbytes: int, before: bool, reads: str, busy: str | None) -> None:
    _mode(before)
    got = {}

    async def on_connect(reader, writer):
        if reads == "stream":
            got["streams"] = reader, writer
        else:
            got["chan"] = channel.TLSChannel(reader, writer, max_frame=nbytes + 4096)
    server = channel.run(asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context(cert, key)))
    q.put(server.sockets[0].getsockname()[1])
    while not got:
        time.sleep(0.01)
    stop = threading.Event()
    if busy:
        threading.Thread(target=_busy, args=(stop, busy), daemon=True).start()
    if reads == "stream":
        reader, writer = got["streams"]
        c0 = _cpu()  # from the start mark on: the sender waits for nothing before it
        channel.run(_stream_frames(reader, frames, nbytes))
        q.put(_cpu() - c0)
        stop.set()

        async def ack_then_wait_for_goodbye():  # the sender closes first: no reset of unread bytes
            writer.write(channel.frame(np.zeros(1, np.int64)))
            await writer.drain()
            try:
                await channel.read_frame(reader, 64)
            except (asyncio.IncompleteReadError, OSError):
                pass
            writer.close()
        channel.run(ack_then_wait_for_goodbye())
        return
    chan = got["chan"]
    chan._recv_raw()  # the sender's start mark
    c0 = _cpu()
    for _ in range(frames):
        chan._recv_raw()
    q.put(_cpu() - c0)
    stop.set()
    chan._send_raw(np.zeros(1, np.int64))
    try:
        chan._recv_raw()  # the sender's goodbye: it closes first
    except channel.ChannelError:
        pass
    chan.close()


def one(cert: str, key: str, mib: int, frame_kib: int, before: bool = False, reads: str = "frames",
        busy: str | None = None) -> dict:
    nbytes = frame_kib << 10
    frames = max(1, (mib << 20) // nbytes)
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(q, cert, key, frames, nbytes, before, reads, busy))
    proc.start()
    port = q.get(timeout=60)
    _mode(before)
    chan = channel.dial("127.0.0.1", port, cert, fingerprint(cert), max_frame=nbytes + 4096)
    arr = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    chan._send_raw(np.zeros(1, np.int64))
    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(frames):
        chan._send_raw(arr)
    chan._recv_raw()  # the receiver has every frame
    wall, sender = time.perf_counter() - t0, _cpu() - c0
    receiver = q.get(timeout=60)
    chan.close()
    proc.join(30)
    return {"frame_kib": frame_kib, "MiB": frames * nbytes / 2**20,
            "wall_s": round(wall, 3), "MiB_per_s": round(frames * nbytes / 2**20 / wall, 1),
            "cpu_sender_s": round(sender, 3), "cpu_receiver_s": round(receiver, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=400, help="MiB sent per measurement (default 400)")
    ap.add_argument("--frame-kib", type=int, nargs="+", default=[64, 1024, 8192], help="frame sizes in KiB")
    ap.add_argument("--repeats", type=int, default=2, help="alternations of now / before per frame size")
    ap.add_argument("--compare", choices=["writes", "reads"], default="writes",
                    help="writes: pieces against the whole frame at once; reads: FrameReceiver against a stream")
    ap.add_argument("--busy", choices=["py", "c"], help="a thread in the receiving process runs a Python loop (py) "
                                                       "or C code that holds the GIL (c)")
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    if a.mib < 1 or a.repeats < 1 or any(f < 1 for f in a.frame_kib):
        ap.error("--mib, --repeats and every --frame-kib must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = ensure_certificate(tmp)
        for f in a.frame_kib:
            for r in range(a.repeats):
                for label, before in (("now", False), ("before", True)):
                    kw = {"before": before} if a.compare == "writes" else {"reads": "stream" if before else "frames"}
                    row = {a.compare: label, "repeat": r, "busy": a.busy, **one(cert, key, a.mib, f, busy=a.busy, **kw)}
                    rows.append(row)
                    print(f"{f:6d} KiB frames, {label:6s}: {row['MiB_per_s']:7.1f} MiB/s, CPU sender "
                          f"{row['cpu_sender_s']:.2f} s, receiver {row['cpu_receiver_s']:.2f} s", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"command": "scripts/bench_tls.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(a).items() if v is not None and k != "out"),
                "switch_interval_us": channel.switch_interval_us(),
                "machine": f"{platform.machine()} {mp.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
                "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
