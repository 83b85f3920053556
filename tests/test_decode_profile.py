"""scripts/decode_profile.py's buckets: py-spy stacks (outermost frame first) go to what the work is
for, also when an HE thread runs it (its stack starts at the pool, not at the caller)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("decode_profile", ROOT / "scripts" / "decode_profile.py")
dp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dp)

POOL = ["Thread._bootstrap (threading.py:1002)", "_worker (concurrent/futures/thread.py:83)",
        "_WorkItem.run (concurrent/futures/thread.py:58)"]


def label(*frames: str) -> str:
    return dp.bucket_of(list(frames))


def test_work_on_an_he_thread_goes_to_its_purpose():
    assert label(*POOL, "rotate_many.<locals>.<lambda> (cryptogen/he/hoist.py:170)",
                 "rotate (cryptogen/he/hoist.py:156)").startswith("HE linear layers")
    assert label(*POOL, "ServerEngine.dot_ct_pt.<locals>.part (cryptogen/he/engine.py:375)",
                 "mac (cryptogen/he/ntt.py:130)").startswith("HE attention")
    assert label(*POOL, "ServerEngine._make_enc_zero (cryptogen/he/engine.py:240)",
                 "enc_zero (cryptogen/he/enczero.py:75)", "inverse (cryptogen/he/ntt.py:122)").startswith("HE export")


def test_innermost_mark_wins_and_waiting_leaves_are_waiting():
    assert label("Driver.forward (cryptogen/driver.py:80)", "layernorm (cryptogen/mpc/layernorm.py:90)",
                 "trunc (cryptogen/mpc/compare.py:200)", "eval_ (cryptogen/mpc/dcf.py:264)") \
        == "2PC truncation (DCF evaluation)"
    assert label("trunc (cryptogen/mpc/compare.py:200)", "Channel.recv (cryptogen/mpc/channel.py:50)",
                 "InMemoryChannel._recv_raw (cryptogen/mpc/channel.py:90)") == dp.WAITING
    assert label("main (x.py:1)", "helper (x.py:2)") == "other (numpy glue, framing, Python)"


def test_idle_he_threads_and_the_dealer_between_steps_are_left_out(tmp_path):
    raw = tmp_path / "p.raw"
    raw.write_text("\n".join([
        ";".join(POOL[:2]) + " 7",  # an HE thread with no task
        ";".join(["run (p.py:1)", "ahead (cryptogen/bench.py:220)", "DealerSource.preprocess (p.py:2)",
                  "gen (cryptogen/mpc/dcf.py:192)"]) + " 5",
        ";".join(["Driver.forward (d.py:1)", "gelu (cryptogen/mpc/gelu.py:40)"]) + " 3",
    ]) + "\n")
    counts, no_task, offline = dp.bucket_counts(raw)
    assert (dict(counts), no_task, offline) == ({"2PC GELU": 3}, 7, 5)
