"""The shaped relay of the network bench (cryptogen/net/shaper.py) against a local echo server:
bytes intact both ways, a small message's round trip ~ RTT, throughput ~ rate, delays pipelined."""
import os
import socket
import threading
import time

import pytest

from cryptogen.net.shaper import PROFILES, ShapedRelay, is_loopback


class Echo:
    """A blocking echo server on 127.0.0.1 (one thread per connection); ``sink`` mode only counts
    bytes and notes when ``expect`` of them have arrived."""

    def __init__(self, sink: bool = False, expect: int = 0):
        self.sink, self.expect, self.done_at, self.got = sink, expect, None, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1 << 16):
                if self.sink:
                    self.got += len(data)
                    if self.got >= self.expect and self.done_at is None:
                        self.done_at = time.perf_counter()
                else:
                    conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


def _dial(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 16, n - len(buf)))
        assert chunk, "the relay closed early"
        buf += chunk
    return bytes(buf)


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def test_profiles_and_loopback_only():
    assert PROFILES == {"lan": (0.0005, 1e9), "wan": (0.040, 100e6)}
    assert is_loopback("127.0.0.1") and is_loopback("localhost")
    with pytest.raises(ValueError, match="loopback"):
        ShapedRelay("192.0.2.1", 80, 0.01, 1e6)


def test_bytes_intact_both_ways(echo):
    data = os.urandom(5 << 20)
    with ShapedRelay("127.0.0.1", echo.port, 0.002, 1e9) as relay, _dial(relay.port) as s:
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        back = _recv_exactly(s, len(data))
        sender.join()
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""  # the half-close travels through and back
    assert back == data
    assert relay.bytes == {"up": len(data), "down": len(data)}


def test_round_trip_is_rtt(echo):
    with ShapedRelay("127.0.0.1", echo.port, 0.1, 1e9) as relay, _dial(relay.port) as s:
        s.sendall(b"x")
        _recv_exactly(s, 1)  # connection set up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            s.sendall(b"ping" * 16)
            _recv_exactly(s, 64)
            times.append(time.perf_counter() - t0)
    assert 0.1 <= min(times) < 0.2, times


def test_throughput_is_rate():
    n, rate = 2 << 20, 8e6
    sink = Echo(sink=True, expect=n)
    try:
        with ShapedRelay("127.0.0.1", sink.port, 0.002, rate) as relay, _dial(relay.port) as s:
            t0 = time.perf_counter()
            s.sendall(os.urandom(n))
            deadline = time.monotonic() + 10
            while sink.done_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sink.done_at is not None
            seconds = sink.done_at - t0
    finally:
        sink.close()
    expected = n * 8 / rate  # 2.1 s
    assert 0.75 * expected <= seconds <= 1.25 * expected, (seconds, expected)


def test_delays_are_pipelined(echo):
    """10 small sends 10 ms apart each come back ~RTT after their own send (not 10 RTTs later)."""
    rtt = 0.2
    with ShapedRelay("127.0.0.1", echo.port, rtt, 1e9) as relay, _dial(relay.port) as s:
        s.sendall(b"x")
        _recv_exactly(s, 1)
        sent, got = [], []

        def reader():
            for _ in range(10):
                _recv_exactly(s, 8)
                got.append(time.perf_counter())
        th = threading.Thread(target=reader)
        th.start()
        for i in range(10):
            sent.append(time.perf_counter())
            s.sendall(b"%08d" % i)
            time.sleep(0.01)
        th.join(10)
    assert len(got) == 10
    lags = [g - t for g, t in zip(got, sent)]
    assert min(lags) >= rtt, lags  # never early
    assert max(lags) < 1.5 * rtt, lags  # serialized delays: the k-th back after ~(k + 1) * rtt
