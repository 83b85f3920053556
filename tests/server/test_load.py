"""Load (issue #13): ``--max-sessions 8`` sessions at once on one ``cryptogen serve`` (its own OS
process, one worker actor) from 8 client threads over TLS, each getting exactly plaintext greedy;
a 9th client while the 8 are open is refused with "busy, retry after N s"; all freed afterwards.

Cost: the dealer provider (the dealer-free "he" one makes each session's randomness up front, about
twice the time on this 2-core machine); 1 token per session (its prefill and token-only argmax; a
2nd, KV-cache decode adds ~25 s here); ~10 CPU-seconds per session (keys and 80 MB public context,
client half, worker half), most of it in the single worker process, which bounds the wall time.
``scripts/load.py`` runs the same with more sessions/tokens and records the numbers
(docs/bench/load.json); the decode under concurrency is measured there.
"""
import threading
import time

import pytest

from conftest import PROMPTS, ServerProcess, cpu_seconds, process_tree

from cryptogen.client.remote import connect
from cryptogen.net.control import RemoteError

pytestmark = pytest.mark.slow

SESSIONS = 8
TOKENS = 1
LOAD_PROMPTS = [list(p) for p in PROMPTS] + [[1, 2, 3], [5, 6], [200, 13, 8], [77, 31], [11, 250, 60]]
WAIT = 300  # seconds any one wait may take before the test fails instead of hanging


@pytest.fixture(scope="module")
def server8(tiny_folder, dealer, tmp_path_factory):
    s = ServerProcess(tiny_folder, tmp_path_factory.mktemp("serve-load"), workers=1, max_sessions=SESSIONS,
                      dealer=dealer)
    yield s
    s.stop()


def test_eight_concurrent_sessions_get_greedy_and_a_ninth_is_told_busy(server8, dealer, greedy):
    assert len(LOAD_PROMPTS) >= SESSIONS
    before = server8.metrics()
    all_open = threading.Barrier(SESSIONS + 1, timeout=WAIT)  # every session has its first token
    go_on = threading.Event()  # the 9th client was refused: the 8 finish
    out, latency, errors = {}, {}, []

    def one(i: int) -> None:
        t0 = time.monotonic()
        try:
            with connect(server8.conn_file, dealer=dealer.client_file) as c:
                gen = c.generate(LOAD_PROMPTS[i], TOKENS, provider="dealer")
                tokens = [next(gen)]  # the session stays open until the generator ends
                all_open.wait()
                assert go_on.wait(WAIT)
                tokens += list(gen)
            out[i], latency[i] = tokens, time.monotonic() - t0
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append((i, e))
            all_open.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(SESSIONS)]
    server_pids = [server8.proc.pid, *process_tree(server8.proc.pid)]
    cpu0, t0 = cpu_seconds([0, *server_pids]), time.monotonic()
    for th in threads:
        th.start()
    try:
        all_open.wait()
    except threading.BrokenBarrierError:
        go_on.set()
        for th in threads:
            th.join(60)
        pytest.fail(f"not every session opened: {errors!r}")
    try:
        assert server8.metrics()["cryptogen_server_sessions_open"] == SESSIONS
        # a 9th client while 8 are open: "busy, retry after N s", one line, nothing started
        with connect(server8.conn_file, dealer=dealer.client_file) as c:
            with pytest.raises(RemoteError) as busy:
                next(c.generate(LOAD_PROMPTS[0], 1, provider="dealer"))
        assert busy.value.code == "busy" and busy.value.retry_after and busy.value.retry_after > 0
        assert "busy" in str(busy.value) and f"retry after {busy.value.retry_after:.0f} s" in str(busy.value)
        assert "\n" not in str(busy.value)
        assert server8.metrics()["cryptogen_server_sessions_open"] == SESSIONS
    finally:
        go_on.set()
        for th in threads:
            th.join(WAIT)
    wall, cpu1 = time.monotonic() - t0, cpu_seconds([0, *server_pids])
    assert not any(th.is_alive() for th in threads), "a client thread hangs"
    assert not errors, errors
    assert [out[i] for i in range(SESSIONS)] == [greedy(LOAD_PROMPTS[i], TOKENS) for i in range(SESSIONS)]
    print(f"\n{SESSIONS} sessions x {TOKENS} tokens: wall {wall:.1f} s, per-session "
          f"{min(latency.values()):.1f}-{max(latency.values()):.1f} s; CPU s: clients+dealer (this process) "
          f"{cpu1[0] - cpu0[0]:.1f}, serve {cpu1[server_pids[0]] - cpu0[server_pids[0]]:.1f}, worker/Ray processes "
          f"{sum(cpu1.get(p, cpu0.get(p, 0)) - cpu0.get(p, 0) for p in server_pids[1:]):.1f}")

    # all ended: the server's own counts show nothing open, the 8 opened, the 9th refused as busy
    assert server8.wait_metric("cryptogen_server_sessions_open", lambda v: v == 0, 30) == 0
    after = server8.metrics()
    assert after["cryptogen_server_sessions_total"] == before["cryptogen_server_sessions_total"] + SESSIONS
    busy_key = 'cryptogen_server_sessions_refused_total{reason="busy"}'
    assert after[busy_key] == before[busy_key] + 1
    assert after["cryptogen_server_sessions_failed_total"] == before["cryptogen_server_sessions_failed_total"]
    assert server8.wait_metric('cryptogen_kv_cache_bytes{worker="w0"}', lambda v: v == 0, 30) == 0
