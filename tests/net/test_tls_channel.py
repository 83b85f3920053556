"""The TLS channel of every client<->server link (cryptogen/net/channel.py) on loopback, no Ray:
order and dtypes, simultaneous large sends, frame caps, back-pressure, and the pinned certificate."""
import asyncio
import struct
import threading
import time

import numpy as np
import pytest

from cryptogen.mpc.errors import ChannelError
from cryptogen.net.channel import TLSChannel, dial, run
from cryptogen.net.frames import SCRATCH
from cryptogen.net.tls import ensure_certificate, fingerprint, server_context


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return ensure_certificate(tmp_path_factory.mktemp("state"))


def _pair(tls, max_frame=64 << 20, late=0.0):
    box, ready = {}, threading.Event()

    async def on_connect(reader, writer):
        await asyncio.sleep(late)  # the client's frames pile up in the stream meanwhile
        box["server"] = TLSChannel(reader, writer, max_frame=max_frame, timeout=30)
        ready.set()
    server = run(asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context(*tls)))
    port = server.sockets[0].getsockname()[1]
    client = dial("127.0.0.1", port, tls[0], fingerprint(tls[0]), max_frame=max_frame)
    if late:
        return client, (box, ready), server
    assert ready.wait(10)
    return client, box["server"], server


def test_both_parties_send_large_messages_at_once(tls):
    """An opening is 'send mine, then receive theirs' on both sides at once. Messages far larger
    than the socket buffers (40 MB each way) must not wait for each other (a blocking send hung a
    2PC LayerNorm over a 128-token window)."""
    client, server, _ = _pair(tls)
    rng = np.random.default_rng(0)
    mine = {"client": rng.integers(0, 2**40, 5_000_000), "server": rng.integers(0, 2**40, 5_000_000)}
    got, errors = {}, []

    def party(name, chan):
        try:
            chan.send(mine[name])
            got[name] = chan.recv()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=party, args=("client", client), daemon=True),
               threading.Thread(target=party, args=("server", server), daemon=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and not any(th.is_alive() for th in threads), errors
    np.testing.assert_array_equal(got["client"], mine["server"])
    np.testing.assert_array_equal(got["server"], mine["client"])
    client.close()
    with pytest.raises(ChannelError, match="closed"):
        server.recv()
    server.close()


def test_messages_keep_their_order_and_dtypes(tls):
    client, server, _ = _pair(tls)
    sent = [np.arange(5), np.ones((2, 3)), np.array([True, False]), np.zeros(0, np.uint8), np.arange(7) * 3]
    for a in sent:
        client.send(a)
    for a in sent:
        b = server.recv()
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    client.close()
    server.close()


def test_oversized_frame_header_is_refused_before_allocating(tls):
    """A header claiming a (2^40,) int64 array is refused from the header alone (the old TCP
    channel allocated it: MemoryError in a worker holding every session's cache)."""
    client, server, _ = _pair(tls, max_frame=1 << 20)
    client.send_bytes(struct.pack("<BB", 0, 1) + struct.pack("<q", 1 << 40))
    with pytest.raises(ChannelError, match="over this link's cap"):
        server.recv()
    client.abort()


def test_wrong_pin_is_refused(tls, tmp_path):
    other = ensure_certificate(tmp_path / "other")
    _, _, srv = _pair(tls)
    port = srv.sockets[0].getsockname()[1]
    with pytest.raises(Exception, match="pinned|certificate|verify"):
        dial("127.0.0.1", port, other[0], fingerprint(other[0]))


def test_a_peer_far_ahead_is_not_read_until_the_consumer_catches_up(tls):
    """Back-pressure: with max_ahead 1 MiB, 40 frames of 512 KiB sent at once are not all parsed into
    memory; the receiver stops reading (the sender's TCP window fills) and every frame still comes
    out in order once the consumer takes them. Reference: the frames sent."""
    client, server, _ = _pair(tls)
    server.max_ahead = 1 << 20
    sent = [np.full(1 << 16, i, np.int64) for i in range(40)]
    for a in sent:
        client.send(a)
    time.sleep(1.0)
    with server._count_lock:
        held, paused = server._buffered, server._reading_paused
    assert paused and held <= server.max_ahead + (1 << 19) + SCRATCH, held
    for a in sent:
        np.testing.assert_array_equal(server.recv(), a)
    assert not server._reading_paused
    client.close()
    server.close()



@pytest.mark.parametrize("env, expected", [(None, 200e-6), ("1000", 1e-3), ("0", 5e-3)])
def test_the_tls_loop_shortens_the_gil_switch_interval(env, expected):
    """Every SSL read gives the GIL up and takes it back: the process that runs the TLS loop asks
    for the GIL back sooner (CRYPTOGEN_SWITCH_INTERVAL_US, 0 keeps Python's 5 ms)."""
    import os
    import subprocess
    import sys
    e = {k: v for k, v in os.environ.items() if k != "CRYPTOGEN_SWITCH_INTERVAL_US"}
    if env is not None:
        e["CRYPTOGEN_SWITCH_INTERVAL_US"] = env
    out = subprocess.run([sys.executable, "-c", "import sys; from cryptogen.net.channel import io_loop; "
                          "a = sys.getswitchinterval(); io_loop(); print(a, sys.getswitchinterval())"],
                         env=e, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert float(out[0]) == 5e-3 and float(out[1]) == pytest.approx(expected)


def test_frames_that_piled_up_before_the_channel_took_the_link_all_arrive(tls):
    """The server builds its channel 0.5 s after the handshake (as the link server does after the
    token): meanwhile 4 MB of frames fill the stream, which stops reading at twice its limit. The
    channel takes that over and reads on. Reference: the frames sent."""
    client, (box, ready), _ = _pair(tls, late=0.5)
    sent = [np.arange(i, i + 50_000) for i in range(10)]
    for a in sent:
        client.send(a)
    assert ready.wait(10)
    server = box["server"]
    server.timeout = 10
    for a in sent:
        np.testing.assert_array_equal(server.recv(), a)
    client.close()
    server.close()
