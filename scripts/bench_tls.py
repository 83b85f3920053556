"""Throughput and CPU of one TLS link (``cryptogen.net.channel``) between two processes on loopback.

The sender sends ``--mib`` MiB in frames of each ``--frame-kib`` size; the receiver takes them. Each
size runs with the channel's writes as they are (pieces of ``WRITE_CHUNK``, each drained first) and as
they were before (every frame handed to asyncio's SSL transport at once, never drained), alternated,
so the ratio is measured in one run. CPU seconds are each process's own (user + system).

    .venv/bin/python scripts/bench_tls.py --mib 400 --frame-kib 64 1024 8192 --out docs/bench/tls_write_chunks.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import resource
import tempfile
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


def _receiver(q, cert: str, key: str, frames: int, nbytes: int, before: bool) -> None:
    _mode(before)
    got = {}

    async def on_connect(reader, writer):
        got["chan"] = channel.TLSChannel(reader, writer, max_frame=nbytes + 4096)
    server = channel.run(asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context(cert, key)))
    q.put(server.sockets[0].getsockname()[1])
    while "chan" not in got:
        time.sleep(0.01)
    chan = got["chan"]
    chan._recv_raw()  # the sender's start mark
    c0 = _cpu()
    for _ in range(frames):
        chan._recv_raw()
    q.put(_cpu() - c0)
    chan._send_raw(np.zeros(1, np.int64))
    chan.close()


def one(cert: str, key: str, mib: int, frame_kib: int, before: bool) -> dict:
    nbytes = frame_kib << 10
    frames = max(1, (mib << 20) // nbytes)
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(q, cert, key, frames, nbytes, before))
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
                    row = {"writes": label, "repeat": r, **one(cert, key, a.mib, f, before)}
                    rows.append(row)
                    print(f"{f:6d} KiB frames, {label:6s}: {row['MiB_per_s']:7.1f} MiB/s, CPU sender "
                          f"{row['cpu_sender_s']:.2f} s, receiver {row['cpu_receiver_s']:.2f} s", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"command": "scripts/bench_tls.py " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(a).items() if v is not None and k != "out"),
                "machine": f"{platform.machine()} {mp.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
                "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
