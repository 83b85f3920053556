"""``through_restarts``: a repeatable call sent while a worker's process is dying fails with
``RayActorError`` before Ray restarts the worker; the pool repeats it until the worker is back
(or the wait is over). Fake clock, no Ray cluster."""
import pytest
import ray.exceptions

from cryptogen.scheduler.ray_runner import through_restarts


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def flaky(failures, exc=lambda: ray.exceptions.ActorUnavailableError("restarting", None)):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= failures:
            raise exc()
        return ("incarnation-2", 4242)
    return call, calls


def test_a_worker_back_after_a_few_failed_calls_answers():
    clock = Clock()
    call, calls = flaky(3)
    assert through_restarts(call, wait=10, pause=0.5, clock=clock, sleep=clock.sleep) == ("incarnation-2", 4242)
    assert len(calls) == 4 and clock.t == pytest.approx(1.5)


def test_a_worker_not_back_in_time_raises_the_actor_error():
    clock = Clock()
    call, calls = flaky(10**6, exc=lambda: ray.exceptions.RayActorError(error_msg="the actor died"))
    with pytest.raises(ray.exceptions.RayActorError):
        through_restarts(call, wait=5, pause=0.5, clock=clock, sleep=clock.sleep)
    assert clock.t == pytest.approx(5.0) and len(calls) == 11


def test_other_errors_are_not_repeated():
    clock = Clock()
    call, calls = flaky(1, exc=lambda: ValueError("a bug, not a restart"))
    with pytest.raises(ValueError):
        through_restarts(call, wait=10, clock=clock, sleep=clock.sleep)
    assert len(calls) == 1
