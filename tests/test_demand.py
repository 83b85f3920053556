"""The client's forecast of correlated randomness per request (client/demand.py) against the
real consumption of in-process secure runs: fitted on one generation, it must predict another
generation (other prompt length, other contexts) and a scoring pass exactly (up to its margin)."""
import numpy as np
import torch

from cryptogen.client.demand import MARGIN, DemandModel
from cryptogen.model import GPT, GPTConfig
from cryptogen.driver import Driver
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.plan import make_plan

CFG = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=1, n_head=2)


def _consumption(model, plan, prompt, steps):
    """(start, T, logits) -> consumed per worker link, step by step."""
    runner = InProcessRunner(model, plan, prompt)
    driver = Driver(runner, model.config, plan)
    out, last = [], {w: {} for w in runner.client_parties}
    for start, T, logits in steps:
        driver.forward(start, T, logits)
        step = {}
        for w, p in runner.client_parties.items():
            now = dict(p.cr.counters()["consumed"])
            step[w] = {k: now.get(k, 0) - last[w].get(k, 0) for k in ("triple", "bits")}
            last[w] = now
        out.append(step)
    return out


def test_forecast_from_one_generation_predicts_another(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    plan = make_plan(CFG.n_layer, CFG.n_head, CFG.d_ff, 2)
    train = [(0, 3, "last"), (3, 1, "last"), (4, 1, "last"), (5, 1, "last")]
    demand = DemandModel("test", tmp_path)
    for (start, T, logits), got in zip(train, _consumption(model, plan, [1, 2, 3], train)):
        for w, c in got.items():
            demand.observe(w, start, T, logits, c)
    demand.save()
    again = DemandModel("test", tmp_path)  # persisted
    test = [(0, 5, "last"), (5, 1, "last"), (6, 1, "last")]
    real = _consumption(model, plan, [9, 8, 7, 6, 5], test)
    for w in (0, 1):
        want = {k: sum(step[w][k] for step in real) for k in ("triple", "bits")}
        got = again.predict(w, test)
        for k in want:
            assert want[k] <= got[k] <= want[k] * MARGIN * 1.01 + 1, (w, k, want[k], got[k])  # never short, <3% over


def test_no_forecast_before_enough_observations(tmp_path):
    demand = DemandModel("empty", tmp_path)
    assert demand.predict(0, [(0, 4, "last")]) is None
    for start in range(3):
        demand.observe(0, start, 1, "last", {"triple": 10 + start, "bits": 5})
    assert demand.predict(0, [(0, 4, "last")]) is None  # T never varied: not determined
