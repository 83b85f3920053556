"""``FrameReceiver`` (cryptogen/net/frames.py) without sockets: bytes handed over the way asyncio's SSL
layer does (``get_buffer`` then ``buffer_updated``), cut anywhere. The frames that come out must equal
the arrays sent, in order, whatever the cuts; bad frames end the link with one ``ChannelError``."""
import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptogen.mpc.errors import ChannelError
from cryptogen.net import frames
from cryptogen.net.frames import DIRECT_MIN, GOODBYE, FrameReceiver, frame


class FakeTransport:
    def __init__(self):
        self.aborted = self.closing = False
        self.protocol = None

    def abort(self):
        self.aborted = True

    def is_closing(self):
        return self.closing or self.aborted

    def set_protocol(self, p):
        self.protocol = p

    def write(self, data):
        pass

    def resume_reading(self):
        self.resumed = True


def receiver(cap=1 << 30):
    got, ends = [], []
    r = FrameReceiver(lambda: cap, got.append, ends.append)
    r.transport = FakeTransport()
    return r, got, ends


def hand_over(r: FrameReceiver, data: bytes, cuts) -> None:
    """What the SSL layer does: decrypt at most ``len(get_buffer())`` bytes, at most one cut, into it."""
    pos, cuts = 0, list(cuts) or [len(data)]
    i = 0
    while pos < len(data):
        buf = r.get_buffer(-1)
        k = min(len(buf), len(data) - pos, max(1, cuts[i % len(cuts)]))
        buf[:k] = data[pos:pos + k]
        r.buffer_updated(k)
        pos, i = pos + k, i + 1


arrays = st.one_of(
    st.builds(lambda n, s: np.random.default_rng(s).integers(-2**62, 2**62, n), st.integers(0, 9000), st.integers(0, 2**32)),
    st.builds(lambda n, s: np.random.default_rng(s).integers(0, 256, n, dtype=np.uint8), st.integers(0, 70000),
              st.integers(0, 2**32)),
    st.builds(lambda a, b, s: np.random.default_rng(s).standard_normal((a, b)), st.integers(0, 5), st.integers(0, 5),
              st.integers(0, 2**32)),
    st.builds(lambda n, s: np.random.default_rng(s).integers(0, 2, n).astype(bool), st.integers(0, 40), st.integers(0, 2**32)),
    st.builds(lambda v: np.array(v, np.int64), st.integers(-2**63, 2**63 - 1)),  # rank 0
)


@settings(max_examples=60, deadline=None)
@given(st.lists(arrays, min_size=1, max_size=6), st.lists(st.integers(1, 100_000), max_size=8))
def test_frames_come_out_as_sent_whatever_the_cuts(sent, cuts):
    """Reference: the arrays themselves (dtype, shape, every element). Frames over DIRECT_MIN go
    through the direct path (payload decrypted into the array), the rest through the scratch buffer."""
    r, got, ends = receiver()
    hand_over(r, b"".join(frame(a) for a in sent), cuts)
    assert not ends and len(got) == len(sent)
    for a, b in zip(sent, got):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)


def test_a_large_payload_is_decrypted_into_its_own_array():
    """The buffer handed out for a large payload's rest is the array's memory, not the scratch."""
    r, got, _ = receiver()
    a = np.arange(3 * DIRECT_MIN, dtype=np.int64)
    data = frame(a)
    hand_over(r, data[:100], [100])  # header and the payload's first bytes, through the scratch
    buf = r.get_buffer(-1)
    assert len(buf) == a.nbytes - (100 - 10) and np.shares_memory(np.asarray(buf), r._arr)
    hand_over(r, data[100:], [50_000])
    np.testing.assert_array_equal(got[0], a)


@pytest.mark.parametrize("bad, message", [
    (bytes([7, 1]) + (5).to_bytes(8, "little"), "malformed message header"),
    (bytes([0, 9]), "malformed message header"),
    (bytes([0, 1]) + (-3).to_bytes(8, "little", signed=True), "malformed message shape"),
    (bytes([0, 2]) + (1 << 20).to_bytes(8, "little") + (1 << 20).to_bytes(8, "little"), "over this link's cap"),
])
def test_a_bad_frame_ends_the_link_once_and_nothing_after_it_counts(bad, message):
    r, got, ends = receiver(cap=1 << 20)
    hand_over(r, frame(np.arange(3)) + bad + frame(np.arange(4)), [3])
    assert len(got) == 1 and len(ends) == 1 and r.transport.aborted
    with pytest.raises(ChannelError, match=message):
        raise ends[0]


def test_the_cap_is_read_when_each_header_arrives():
    """A server raises a link's cap once the client has authenticated: the next frame may be larger."""
    cap = {"now": 64}
    got, ends = [], []
    r = FrameReceiver(lambda: cap["now"], got.append, ends.append)
    r.transport = FakeTransport()
    big = np.arange(100)
    hand_over(r, frame(np.arange(4)), [])
    cap["now"] = 1 << 20
    hand_over(r, frame(big), [])
    assert not ends and np.array_equal(got[1], big)


def test_goodbye_and_closing_say_why():
    r, got, ends = receiver()
    hand_over(r, frame(np.arange(2)) + GOODBYE + frame(np.arange(3)), [1])
    assert len(got) == 1 and len(ends) == 1 and "closed the channel" in str(ends[0])
    r, _, ends = receiver()
    hand_over(r, frame(np.arange(2 * DIRECT_MIN))[:40_000], [])
    r.connection_lost(None)
    assert len(ends) == 1 and "closed the connection" in str(ends[0])
    r, _, ends = receiver()
    r.connection_lost(ConnectionResetError())
    r.connection_lost(None)
    assert [str(e) for e in ends] == ["receive failed: ConnectionResetError"]


def test_attach_keeps_what_the_stream_had_already_read():
    """Frames that arrived before the hand-over (the link token's next frames) are not lost."""
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(frame(np.arange(5)) + frame(np.ones(3))[:7])
        got, ends = [], []
        r = FrameReceiver(lambda: 1 << 20, got.append, ends.append)
        t = FakeTransport()
        r.attach(t, reader)
        assert t.protocol is r and t.resumed  # a stream that held much had paused its transport
        hand_over(r, frame(np.ones(3))[7:], [])
        return got, ends
    got, ends = asyncio.run(go())
    assert not ends and np.array_equal(got[0], np.arange(5)) and np.array_equal(got[1], np.ones(3))


def test_a_bad_frame_among_what_the_stream_held_ends_the_link():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(frame(np.arange(2)) + bytes([9, 0]))
        got, ends = [], []
        r = FrameReceiver(lambda: 1 << 20, got.append, ends.append)
        t = FakeTransport()
        r.attach(t, reader)
        return got, ends, t
    got, ends, t = asyncio.run(go())
    assert len(got) == 1 and len(ends) == 1 and "malformed message header" in str(ends[0]) and t.aborted


def test_drain_waits_while_the_transport_is_over_its_mark():
    async def go():
        r, _, _ = receiver()
        r.pause_writing()
        waiting = asyncio.ensure_future(r.drain())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        r.resume_writing()
        await asyncio.wait_for(waiting, 1)
        r.pause_writing()
        lost = asyncio.ensure_future(r.drain())
        await asyncio.sleep(0.01)
        r.connection_lost(None)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(lost, 1)
    asyncio.run(go())


def test_read_frame_reads_the_same_frames_from_a_stream():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(frame(np.arange(6).reshape(2, 3)) + GOODBYE)
        return await frames.read_frame(reader, 1 << 20), await frames.read_frame(reader, 1 << 20)
    a, end = asyncio.run(go())
    assert np.array_equal(a, np.arange(6).reshape(2, 3)) and end is None
