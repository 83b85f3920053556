"""The TLS channel of every client<->server link (cryptogen/net/channel.py) on loopback, no Ray:
order and dtypes, simultaneous large sends, frame caps, and the pinned certificate."""
import asyncio
import struct
import threading

import numpy as np
import pytest

from cryptogen.mpc.errors import ChannelError
from cryptogen.net.channel import TLSChannel, dial, run
from cryptogen.net.tls import ensure_certificate, fingerprint, server_context


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return ensure_certificate(tmp_path_factory.mktemp("state"))


def _pair(tls, max_frame=64 << 20):
    box, ready = {}, threading.Event()

    async def on_connect(reader, writer):
        box["server"] = TLSChannel(reader, writer, max_frame=max_frame, timeout=30)
        ready.set()
    server = run(asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context(*tls)))
    port = server.sockets[0].getsockname()[1]
    client = dial("127.0.0.1", port, tls[0], fingerprint(tls[0]), max_frame=max_frame)
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
