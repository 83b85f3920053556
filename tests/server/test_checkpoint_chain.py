"""The gateway's chains of per-step checkpoints (``ServerSession.base`` / ``commit``) without Ray: a
whole checkpoint, deltas after it, a whole one again once the deltas weigh as much, and a resume
from the checkpoint before the latest continuing from it. The workers' side (a chain restores the
live cache byte for byte) is tests/he/test_kv_delta.py; on Ray, tests/secure/test_ray_e2e.py."""
import pytest

from cryptogen.server import session as session_mod
from cryptogen.server.session import ServerSession


@pytest.fixture()
def sess(monkeypatch):
    monkeypatch.setattr(session_mod.ray, "get", lambda refs: refs)  # the metas stand for their refs
    return ServerSession.new(b"public context", "kv-reuse", "he")


def _step(sess, cached, written, workers=2):
    """What every worker answers to ``base()``: whole when there is no base, else a delta."""
    serial, base = sess.base()
    refs = [({"whole": base is None, "written": written if base is not None else 100, "bytes": 90, "exports": 0},
             f"blob{serial}.{w}") for w in range(workers)]
    return serial, base, sess.commit(cached, refs)


def test_deltas_chain_until_they_weigh_as_much_as_the_whole(sess):
    serial, base, ckpt = _step(sess, 10, 0)
    assert (serial, base) == (1, None) and [len(c) for c in ckpt.refs] == [1, 1] and ckpt.kv_bytes == 180
    for cached in range(11, 15):  # deltas of 30 bytes after a whole of 100, per worker
        serial, base, ckpt = _step(sess, cached, 30)
        assert base == serial - 1
    assert [len(c) for c in ckpt.refs] == [5, 5] and ckpt.refs[1][0][1] == "blob1.1"  # 30 * 4 >= 100
    serial, base, ckpt = _step(sess, 15, 30)
    assert base is None and [len(c) for c in ckpt.refs] == [1, 1] and sess.checkpoints[0].serial == serial - 1


def test_a_resume_from_the_one_before_continues_its_chain(sess):
    _step(sess, 10, 0)
    _step(sess, 11, 5)
    before = sess.checkpoint_at(11)
    _step(sess, 12, 5)  # the client never saw this step's "done"
    sess.checkpoints = [sess.checkpoint_at(11)]  # what Gateway.resume keeps
    serial, base, ckpt = _step(sess, 12, 5)
    assert base == before.serial and ckpt.refs[0][:-1] == before.refs[0] and len(ckpt.refs[0]) == 3


def test_a_worker_that_wrote_a_whole_checkpoint_starts_its_chain_again(sess):
    _step(sess, 10, 0)
    serial, base = sess.base()
    refs = [({"whole": False, "written": 5, "bytes": 90, "exports": 0}, "delta.0"),
            ({"whole": True, "written": 100, "bytes": 90, "exports": 0}, "whole.1")]  # its own record disagreed
    ckpt = sess.commit(11, refs)
    assert [r for _, r in ckpt.refs[0]] == ["blob1.0", "delta.0"] and [r for _, r in ckpt.refs[1]] == ["whole.1"]


def test_recompute_sessions_keep_no_cache(sess):
    sess.mode = "recompute"
    ckpt = sess.commit(5, None)
    assert ckpt.refs is None and sess.base() == (ckpt.serial + 1, None)
