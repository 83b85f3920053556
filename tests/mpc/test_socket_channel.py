"""The TCP channel of the Ray deployment (cluster/channel.py) on loopback, without Ray."""
import threading

import numpy as np
import pytest

from cryptogen.cluster.channel import Listener, dial
from cryptogen.mpc.errors import ChannelError


def _pair(timeout=None):
    lis = Listener("127.0.0.1")
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("server", lis.accept()))
    th.start()
    client = dial(lis.host, lis.port)
    th.join()
    return client, box["server"]


def test_both_parties_send_large_messages_at_once():
    """An opening is 'send mine, then receive theirs' on both sides at once. Messages far larger
    than the socket buffers (here 40 MB each way) must not wait for each other (they did with a
    blocking send: a 2PC LayerNorm over a 128-token window hung)."""
    client, server = _pair()
    rng = np.random.default_rng(0)
    mine = {"client": rng.integers(0, 2**40, 5_000_000), "server": rng.integers(0, 2**40, 5_000_000)}
    got, errors = {}, []

    def party(name, chan, other):
        try:
            chan.send(mine[name])
            got[name] = chan.recv()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=party, args=("client", client, "server"), daemon=True),
               threading.Thread(target=party, args=("server", server, "client"), daemon=True)]
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


def test_messages_keep_their_order_and_dtypes():
    client, server = _pair()
    sent = [np.arange(5), np.ones((2, 3)), np.array([True, False]), np.zeros(0, np.uint8), np.arange(7) * 3]
    for a in sent:
        client.send(a)
    for a in sent:
        b = server.recv()
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    client.close()
    server.close()
