"""The dealer-free HE provider with a dedicated offline link and background pools.

References and tolerances: protocol outputs are compared with torch float64 references at the
tolerances of docs/MPC.md (softmax <= 1e-3, GELU <= 2e-3, LayerNorm <= 1e-2, truncation within
1.5 ulp), for both the dealer and the pooled HE provider on the same inputs; triples and solved
bits are checked exactly (c = a*b, bits of r, r < t); secure generation equals plaintext greedy
with logits within 0.05 (tests/secure). Uniformity: chi-square over 32 equal bins at p = 1e-6
(critical value 75.0 for 31 degrees of freedom; the draws come from os.urandom). No timing
assertions: bounded waits only guard against hangs.
"""
import threading
import time

import numpy as np
import pytest
import torch

from cryptogen.field import DEFAULT_T as T
from cryptogen.field import matmul, mul
from cryptogen.mpc import (DealerProvider, ProviderError, channel_pair, gelu, layernorm, reconstruct, share,
                           simulate, softmax, trunc)
from cryptogen.mpc.pool import MAX_MSG
from cryptogen.mpc.provider_he import ClientMaker, HEProvider, ServerMaker

from mpc_helpers import FP, make_rng

pytestmark = pytest.mark.he_provider
CHI2_CRIT = 75.0  # chi-square, 31 dof, p = 1e-6


def pooled(**kw):
    return HEProvider(offline=channel_pair(timeout=60), **kw)


def q(x):
    return FP.decode(FP.encode(x))


def _both(fn_c, fn_s, timeout=120):
    """Run fn_c / fn_s in two threads; (outputs, errors) per role, joined within ``timeout``."""
    out, errs = {}, {}

    def go(role, fn):
        try:
            out[role] = fn()
        except Exception as e:  # noqa: BLE001
            errs[role] = e
    ths = [threading.Thread(target=go, args=("client", fn_c)), threading.Thread(target=go, args=("server", fn_s))]
    [th.start() for th in ths]
    [th.join(timeout) for th in ths]
    assert not any(th.is_alive() for th in ths), "a party hung"
    return out, errs


def test_protocols_match_dealer_and_references():
    rng = make_rng()
    xt = rng.normal(0, 40, 50)
    xs = rng.normal(0, 6, (3, 9)).clip(-30, 30)
    xg = np.concatenate([rng.normal(0, 3, 40), [-4.0, 4.0, 1e4]])
    xl = rng.normal(0.5, 2.0, (2, 16))
    g, b = rng.normal(1, 0.5, 16), rng.normal(0, 0.3, 16)
    ins = [FP.encode(xt * 64), FP.encode(xs), FP.encode(xg), FP.encode(xl)]
    parts = [share(v) for v in ins]

    def fn(p, a, s, gg, ll, gam=None, bet=None):
        return (trunc(p, a, 6), softmax(p, s, causal=True), gelu(p, gg), layernorm(p, ll, gam, bet))

    ref_ln = torch.nn.functional.layer_norm(torch.tensor(q(xl)), (16,), torch.tensor(g), torch.tensor(b), 1e-5)
    valid = np.arange(9)[None] <= np.arange(3)[:, None] + 6
    ref_sm = torch.softmax(torch.tensor(q(xs)).masked_fill(~torch.tensor(valid), float("-inf")), -1).numpy()
    ref_g = torch.nn.functional.gelu(torch.tensor(q(xg)), approximate="tanh").numpy()
    prov = pooled()
    try:
        for provider in (DealerProvider(), prov):
            st = {}
            c, s = simulate(fn, [p[0] for p in parts], [p[1] for p in parts] + [g, b], provider=provider, stats=st)
            tr, sm, ge, ln = (reconstruct(x, y) for x, y in zip(c, s))
            assert np.abs(FP.decode(tr) - FP.decode(ins[0]) / 64).max() <= 1.5 / 4096
            assert np.abs(FP.decode(sm) - ref_sm).max() < 1e-3 and np.all(FP.decode(sm)[~valid] == 0)
            assert np.abs(FP.decode(ge) - ref_g).max() < 2e-3
            assert np.abs(FP.decode(ln) - ref_ln.numpy()).max() < 1e-2
            assert st["client"]["randomness"]["consumed"] == st["server"]["randomness"]["consumed"]
        rc = st["client"]["randomness"]
        assert rc["provider"] == "he" and rc["offline"]["bytes_sent"] > 0 and rc["offline"]["cpu_s"] > 0
        assert "offline" not in st["client"]["channel"]  # nothing produced on the online channel
    finally:
        prov.close()


def test_pools_stay_aligned_under_concurrent_consumption():
    """Both parties consume the same sequence of mixed takes while the producer refills in the
    background (look-ahead on); every take reconstructs to valid correlated randomness."""
    rng = np.random.default_rng(7)
    plan = [("triple", int(n)) for n in rng.integers(1, 9000, 12)] + [("bits", int(n)) for n in rng.integers(1, 3000, 4)]
    plan += [("matrix", (2, 3, 4)), ("matrix", (5, 1, 2)), ("matrix", (2, 3, 4))]
    order = rng.permutation(len(plan))
    prov = pooled(lookahead=2)
    src = {r: prov.source(r, None) for r in ("client", "server")}

    def consume(role):
        s, got = src[role], []
        for i in order:
            kind, arg = plan[i]
            got.append(s.triples((arg,)) if kind == "triple" else s.solved_bits((arg,)) if kind == "bits"
                       else s.matrix_triple(*arg))
            if i % 5 == 0:
                s.mark()
        return got
    try:
        out, errs = _both(lambda: consume("client"), lambda: consume("server"))
        assert not errs
        for i, cg, sg in zip(order, out["client"], out["server"]):
            kind, _ = plan[i]
            vals = [reconstruct(x, y) for x, y in zip(cg, sg)]
            if kind == "triple":
                assert np.array_equal(vals[2], mul(vals[0], vals[1], T))
            elif kind == "matrix":
                assert np.array_equal(vals[2], matmul(vals[0], vals[1], T))
            else:
                bits, r = vals
                assert set(np.unique(bits)) <= {0, 1} and np.all(r < T)
                assert np.array_equal((bits << np.arange(42)).sum(-1), r)
        # the producers may be mid-batch (one side has pushed it, the other not yet): once idle they agree
        deadline = time.monotonic() + 30
        while (src["client"].counters()["produced"] != src["server"].counters()["produced"]
               and time.monotonic() < deadline):
            time.sleep(0.05)
        cc, cs = src["client"].counters(), src["server"].counters()
        assert cc["consumed"] == cs["consumed"] and cc["produced"] == cs["produced"]
    finally:
        prov.close()


def _makers_bits(count, forced_r=None):
    """Run the solved-bits protocol once between a ClientMaker and a ServerMaker; with
    ``forced_r`` the first candidates are made to equal these r (server's bits chosen as x ^ r)."""
    cc, sc = channel_pair(timeout=60, record=True)
    cm, sm = ClientMaker(HEProvider().config), ServerMaker(HEProvider().config)
    if forced_r is not None:
        x = cm.rand_bits((count, 42))
        rb = ((np.asarray(forced_r, np.int64)[:, None] >> np.arange(42)) & 1)
        y = x.copy()
        y[:len(forced_r)] = x[:len(forced_r)] ^ rb
        cm.rand_bits, sm.rand_bits = (lambda shape: x), (lambda shape: y)

    def side(m, ch):
        m.setup(ch)
        return m.bits(ch, count)
    out, errs = _both(lambda: side(cm, cc), lambda: side(sm, sc))
    assert not errs, errs
    big = max(a.nbytes for ch in (cc, sc) for a in ch.transcript)
    return out["client"], out["server"], big


def test_solved_bits_rejection_exact_on_edge_values():
    edges = [0, 1, 2 ** 41, T - 2, T - 1, T, T + 1, 2 ** 42 - 2 ** 21 - 1, 2 ** 42 - 2 ** 21, T - 1 + 2 ** 19,
             2 ** 42 - 2 ** 20, 2 ** 42 - 2 ** 20 - 1, T + 2 ** 18, 2 ** 42 - 2, 2 ** 42 - 1, T - 1 - 2 ** 19]
    (bc, rc), (bs, rs), big = _makers_bits(64, edges)
    bits, r = reconstruct(bc, bs), reconstruct(rc, rs)
    kept = [e for e in edges if e < T]
    assert len(r) == 64 - (len(edges) - len(kept))  # every r >= t rejected, every r < t kept
    assert list(r[:len(kept)]) == kept
    assert np.array_equal((bits << np.arange(42)).sum(-1), r) and np.all(r < T)
    assert big <= MAX_MSG


def _chi2(v, bins=32):
    counts = np.bincount((v.astype(np.float64) * bins / T).astype(np.int64), minlength=bins)
    exp = len(v) / bins
    return float(((counts - exp) ** 2 / exp).sum())


def test_solved_bits_uniform_and_shares_uniform():
    (bc, rc), (bs, rs), _ = _makers_bits(3 * 8192)
    bits, r = reconstruct(bc, bs), reconstruct(rc, rs)
    assert len(r) >= 3 * 8192 - 3 and np.all(r < T)
    assert np.array_equal((bits << np.arange(42)).sum(-1), r)
    for v in (r, rc, rs, bc[:, 0], bs[:, 41]):
        assert _chi2(v) < CHI2_CRIT
    freq = bits.mean(0)  # each bit of r is a fair coin (42 x 24k draws)
    assert np.all(np.abs(freq - 0.5) < 0.02)


def test_producer_failure_surfaces_on_both_sides():
    prov = pooled(lookahead=0, stall_timeout=60)
    c, s = prov.source("client", None), prov.source("server", None)
    calls = []
    real = ServerMaker.vole

    def dying(self, chan, n_in, n, outputs):  # dies after answering part of the batch
        calls.append(1)
        real(self, chan, n_in, min(n, 8192), outputs)
        raise RuntimeError("killed")
    s.maker.vole = dying.__get__(s.maker)
    try:
        out, errs = _both(lambda: c.triples((20000,)), lambda: s.triples((20000,)), timeout=60)
        assert set(errs) == {"client", "server"} and calls
        assert all(isinstance(e, ProviderError) for e in errs.values())
        assert "server" in str(errs["server"]) and "failed" in str(errs["server"])
        assert "offline link" in str(errs["client"])
        with pytest.raises(ProviderError):  # and every later take, at once
            c.solved_bits((3,))
    finally:
        prov.close()
    assert not any(src._thread.is_alive() for src in (c, s))


def test_close_stops_producers_idle_and_mid_batch():
    prov = pooled(lookahead=0)
    c, s = prov.source("client", None), prov.source("server", None)
    out, errs = _both(lambda: c.preprocess(triples=100), lambda: s.preprocess(triples=100))
    assert not errs and c.counters()["pool"]["triple"] >= 100
    prov.close()  # both idle
    assert not c._thread.is_alive() and not s._thread.is_alive()
    with pytest.raises(ProviderError, match="closed"):
        c.triples((1,))

    prov = pooled(lookahead=0)
    c, s = prov.source("client", None), prov.source("server", None)
    c.preprocess(triples=400 * 8192, wait=False)  # a long fill (~10 s of work) in progress
    while c.counters()["offline"]["batches"] < 1:
        threading.Event().wait(0.05)
    c.close(timeout=30)
    s.close(timeout=30)
    assert not c._thread.is_alive() and not s._thread.is_alive()
    assert c.counters()["produced"].get("triple", 0) < 400 * 8192


def test_preprocess_then_online_produces_nothing_and_inline_mode_unchanged():
    prov = pooled(lookahead=0)
    x = FP.encode(np.linspace(-5, 5, 40))
    xc, xs = share(x)

    def fn(p, a):
        p.cr.preprocess(triples=40 * 81, bits=40)
        before = dict(p.cr.produced)
        y = trunc(p, a, 12)
        return y, before, dict(p.cr.produced)
    try:
        (c, b0, b1), (s, _, _) = simulate(fn, (xc,), (xs,), provider=prov)
        assert b0 == b1
        assert np.abs(FP.decode(reconstruct(c, s), 0) - np.linspace(-5, 5, 40)).max() < 2
    finally:
        prov.close()
    assert HEProvider().tag != prov.tag  # an inline party and a pooled party do not handshake


def _tiny_model():
    from cryptogen.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)).eval()
    with torch.no_grad():  # as tests/secure/conftest.py; greedy margins here >= 0.07 (secure error ~0.01)
        for prm in model.parameters():
            if prm.dim() == 2:
                prm.mul_(8.0)
            else:
                prm.add_(0.1 * torch.randn_like(prm))
    return model


def test_inprocess_secure_generation_with_pooled_provider():
    from cryptogen.driver import Driver
    from cryptogen.scheduler.inprocess import InProcessRunner
    from cryptogen.plan import make_plan

    model, prompt, n_new = _tiny_model(), [3, 17], 2
    cfg = model.config
    plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, 1)
    made = []

    def factory():
        made.append(HEProvider(offline=channel_pair(timeout=120)))
        return made[-1]
    runs = {}
    try:
        for name, fac in (("dealer", DealerProvider), ("he", factory)):
            runner = InProcessRunner(model, plan, prompt, provider_factory=fac)
            Driver(runner, cfg, plan).generate(len(prompt), n_new)
            runs[name] = runner
    finally:
        for prv in made:
            prv.close()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        full = model(torch.tensor([ids]))[0][0].numpy()
    for runner in runs.values():
        assert runner.client.generated == ids[len(prompt):]
        worst = max(np.abs(lg - full[len(prompt) - 1 + i]).max() for i, lg in enumerate(runner.client.logit_history))
        assert worst <= 0.05
    cnt = runs["he"].client_parties[0].cr.counters()
    dealer_cnt = runs["dealer"].client_parties[0].cr.counters()
    # the same solved bits (the dealer's truncations take their own kind, one-output keys) and matrix
    # triples; the HE provider's comparisons also take the circuit's Beaver triples where the dealer's
    # DCF keys need none
    assert cnt["provider"] == "he" and cnt["consumed"].get("tbits", 0) == 0 and dealer_cnt["consumed"]["tbits"] > 0
    assert cnt["consumed"]["bits"] == dealer_cnt["consumed"]["bits"] + dealer_cnt["consumed"]["tbits"]
    assert cnt["consumed"].get("matrix") == dealer_cnt["consumed"].get("matrix")
    assert cnt["consumed"]["triple"] > dealer_cnt["consumed"].get("triple", 0)
    assert runs["he"].client_parties[0].chan.stats.as_dict().get("offline") is None
