"""End to end on an embedded Ray cluster: client actor + worker actors over TCP channels,
dealer actor, placement group. Tolerance as in test_secure_inprocess.py (0.05 max abs)."""
import threading

import pytest
import ray

from conftest import PROMPT, assert_logits_close, plain_greedy

from cryptogen.client.generate import SecureGenerator
from cryptogen.cluster.connect import connect, shutdown
from cryptogen.scheduler.ray_runner import WorkerDied

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    shutdown()
    connect(None, num_cpus=4)
    yield
    shutdown()


@pytest.mark.parametrize("workers, mode, n", [(1, "kv-reuse", 16), (2, "kv-reuse", 16), (2, "recompute", 6)])
def test_ray_secure_greedy_equals_plaintext(cluster, tiny_model, workers, mode, n):
    with SecureGenerator(tiny_model, workers=workers, mode=mode) as gen:
        res = gen.generate(PROMPT, n, keep_logits=True)
    assert res.tokens == plain_greedy(tiny_model, PROMPT, n)
    assert_logits_close(res.logits, tiny_model, PROMPT, res.tokens, 0.05)
    assert res.provider == "dealer" and len(res.timings) == n


def test_no_worker_holds_a_secret_key(cluster, tiny_model):
    with SecureGenerator(tiny_model, workers=2) as gen:
        assert ray.get([w.is_public_only.remote() for w in gen.pool.workers]) == [True, True]
        public = ray.get(gen.client.public_context.remote())
        sk = ray.get(gen.client.__ray_call__.remote(lambda self: self.keys.secret_key_bytes()))
    assert len(sk) > 4096 and sk[-4096:] not in public


def test_dead_worker_is_named_and_other_sessions_continue(cluster, tiny_model):
    doomed = SecureGenerator(tiny_model, workers=2)
    healthy = SecureGenerator(tiny_model, workers=1)
    try:
        _kill_and_continue(doomed, healthy, tiny_model)
    finally:
        healthy.close()
        doomed.close()


def _kill_and_continue(doomed, healthy, tiny_model):

    def kill_after_prefill(timing, n_tokens):
        if n_tokens == 1:
            ray.kill(doomed.pool.workers[1])

    with pytest.raises(WorkerDied, match="worker 1 died"):
        doomed.generate(PROMPT, 6, on_step=kill_after_prefill)
    res = healthy.generate(PROMPT, 4)
    assert res.tokens == plain_greedy(tiny_model, PROMPT, 4)


def test_concurrent_sessions_on_one_pool(cluster, tiny_model):
    out = {}
    with SecureGenerator(tiny_model, workers=1) as gen:
        _two_sessions(gen, out)
    assert out["a"] == plain_greedy(tiny_model, PROMPT, 4)
    assert out["b"] == plain_greedy(tiny_model, [9, 100, 4], 4)


def _two_sessions(gen, out):

    def go(key, prompt):
        out[key] = gen.generate(prompt, 4).tokens

    threads = [threading.Thread(target=go, args=(k, p)) for k, p in (("a", PROMPT), ("b", [9, 100, 4]))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
