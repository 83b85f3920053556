"""Telemetry collector: counters, label validation, snapshots and merge semantics."""
import pickle
import threading

import pytest

from cryptogen.telemetry import (STAGES, TOKEN_LATENCY_BUCKETS, Telemetry, TelemetrySnapshot,
                                 worker_label)


def record_some(t: Telemetry) -> None:
    t.add_stage_time("attention", 0.5)
    t.add_stage_time("softmax", 0.25)
    t.token("decode", "kv-reuse", 0.3)
    t.token("prefill", "recompute", 700.0)
    t.he_ops("linear", ct_pt=10, ct_ct=1, rotations=4)
    t.traffic(bytes_to_server=1000, bytes_to_client=500, rounds=3)
    t.triples("triple", produced=100, consumed=40)
    t.refreshes(2)


def test_counters_accumulate():
    t = Telemetry("client")
    record_some(t)
    record_some(t)
    c = t.snapshot().counters
    assert c.stage_seconds == {"attention": 1.0, "softmax": 0.5}
    assert c.he_ops[("linear", "ct_pt_mul")] == 20
    assert c.he_ops[("linear", "rotation")] == 8
    assert c.transfer_bytes == {"to_server": 2000, "to_client": 1000}
    assert (c.rounds, c.refreshes) == (6, 4)
    assert (c.produced["triple"], c.consumed["triple"]) == (200, 80)
    assert c.tokens_by_mode() == {"kv-reuse": 2, "recompute": 2}


def test_token_histogram_buckets():
    t = Telemetry()
    for s in (0.01, 0.05, 0.3, 700.0):
        t.token("decode", "kv-reuse", s)
    h = t.snapshot().counters.token_latency[("decode", "kv-reuse")]
    assert h.count == 4 and h.total == pytest.approx(700.36)
    cum = h.cumulative()
    assert len(cum) == len(TOKEN_LATENCY_BUCKETS) + 1
    assert cum[0] == 2                       # le=0.05 includes the boundary value
    assert cum[TOKEN_LATENCY_BUCKETS.index(0.5)] == 3
    assert cum[-2] == 3 and cum[-1] == 4     # 700 s only in +Inf


def test_stage_context_manager_records_on_error():
    t = Telemetry()
    with t.stage("mlp"):
        pass
    with pytest.raises(RuntimeError):
        with t.stage("gelu"):
            raise RuntimeError("boom")
    assert set(t.snapshot().counters.stage_seconds) == {"mlp", "gelu"}


@pytest.mark.parametrize("call", [
    lambda t: t.add_stage_time("hello world", 1.0),
    lambda t: t.stage("Attention").__enter__(),
    lambda t: t.token("generate", "kv-reuse", 1.0),
    lambda t: t.token("decode", "cache", 1.0),
    lambda t: t.he_ops("bootstrap", ct_pt=1),
    lambda t: t.triples("beaver", produced=1),
    lambda t: t.kv_cache("the secret prompt", 1, 1),
    lambda t: t.kv_cache(99999, 1, 1),
    lambda t: t.kv_cache(True, 1, 1),
    lambda t: t.add_stage_time("mlp", -1.0),
    lambda t: t.add_stage_time("mlp", float("nan")),
    lambda t: t.he_ops("linear", ct_pt=-1),
    lambda t: t.traffic(bytes_to_server=1.5),
    lambda t: t.sessions(-1),
])
def test_bad_label_or_value_raises(call):
    with pytest.raises(ValueError):
        call(Telemetry())


def test_error_message_does_not_echo_the_value():
    with pytest.raises(ValueError) as err:
        Telemetry().add_stage_time("my secret prompt text", 1.0)
    assert "secret" not in str(err.value)
    assert all(s in str(err.value) for s in STAGES)


def test_worker_label_forms():
    assert {worker_label(x) for x in (3, "3", "w3", "worker-3", "worker_3", "worker3")} == {"w3"}


def test_snapshot_is_picklable_value():
    t = Telemetry("worker-1")
    record_some(t)
    t.kv_cache(1, ciphertexts=4, nbytes=4096)
    t.sessions(1)
    s1 = t.snapshot()
    s2 = pickle.loads(pickle.dumps(s1))
    assert isinstance(s2, TelemetrySnapshot) and s2 == s1
    assert t.snapshot().seq > s1.seq
    assert s1.as_dict()["kv_cache"] == {"w1": {"ciphertexts": 4, "bytes": 4096}}
    with pytest.raises(TypeError):
        pickle.dumps(t)


def test_merge_keeps_latest_per_source_no_double_count():
    client, worker = Telemetry("client"), Telemetry("worker-0")
    client.he_ops("lm_head", ct_pt=1)
    worker.he_ops("attention", ct_ct=5)
    first = worker.snapshot()
    assert client.merge(first)
    assert client.merge(first) is False           # duplicate ignored
    worker.he_ops("attention", ct_ct=5)
    second = worker.snapshot()
    assert client.merge(second)
    assert client.merge(first) is False           # stale ignored
    ops = client.snapshot().counters.he_ops
    assert ops[("attention", "ct_ct_mul")] == 10  # not 5 + 10 + 5
    assert ops[("lm_head", "ct_pt_mul")] == 1
    assert client.sources() == ("worker-0",)


def test_merge_survives_worker_restart_monotonic():
    client = Telemetry("client")
    old = Telemetry("worker-0")
    old.refreshes(7)
    old.kv_cache(0, 10, 1000)
    client.merge(old.snapshot())
    new = Telemetry("worker-0")                    # restarted actor: counters start at 0
    new.refreshes(1)
    new.kv_cache(0, 2, 200)
    client.merge(new.snapshot())
    snap = client.snapshot()
    assert snap.counters.refreshes == 8            # retired 7 + live 1, never goes down
    assert snap.gauges.kv_cache == {"w0": (2, 200)}  # gauges replaced, not summed
    old.refreshes(1)
    assert client.merge(old.snapshot()) is False   # late snapshot of a retired instance


def test_merge_gauges_and_hierarchy():
    client, driver = Telemetry("client"), Telemetry("driver")
    w0, w1 = Telemetry("worker-0"), Telemetry("worker-1")
    w0.kv_cache(0, 3, 300)
    w1.kv_cache(1, 4, 400)
    w0.traffic(bytes_to_client=10)
    w1.traffic(bytes_to_client=20)
    client.sessions(2)
    driver.merge(w0.snapshot())
    driver.merge(w1.snapshot())
    client.merge(driver.snapshot())
    snap = client.snapshot()
    assert snap.gauges.kv_cache == {"w0": (3, 300), "w1": (4, 400)}
    assert snap.gauges.active_sessions == 2
    assert snap.counters.transfer_bytes["to_client"] == 30
    with pytest.raises(ValueError):
        client.merge(client.snapshot())


def test_thread_safety():
    t = Telemetry()

    def work():
        for _ in range(500):
            t.he_ops("linear", ct_pt=1)
            t.token("decode", "kv-reuse", 0.1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    c = t.snapshot().counters
    assert c.he_ops[("linear", "ct_pt_mul")] == 2000
    assert c.token_latency[("decode", "kv-reuse")].count == 2000
