"""Both parties' complete transcripts of a real secure generation (``InProcessRunner(record=True)``:
tests/tiny.py's GPT-2 with one layer, two workers so two client-worker links, prefill of a
2-token prompt + one decode step), run twice on the same prompt and once on another prompt of the
same length, with fresh keys, masks and dealer each time.

* ``test_transcripts_are_complete_and_classified``: per link, each party's transcript holds every
  message the peer sent (counted by the peer's channel), the first is the handshake, and every
  other one is an opened-value pack (as many as ``open_`` calls), a ciphertext under the client's
  key, or -- to the client only -- the server's logit shares (vocab columns per generated token).
  Anything else (e.g. a raw share sent to the other party) fails.
* ``test_openings_vary_between_runs``: opening #i of link w in run 1 vs run 2 (the sequence is a
  function of public shapes, checked). The true protocol opens x + r with fresh uniform r, so the
  difference of the two runs is uniform and |signed difference| < 2^24 has probability
  p = (2^25 - 1)/t per element; an opening the prompt determines (LayerNorm output, 2x, a DReLU
  bit, a truncation or softmax input -- up to the +-1 ulp noise of truncations) has such close
  pairs at almost every element. Binomial test per call site at level 1e-7 / sites; sites of
  >= 640 values are also chi-square tested for uniformity at the same level. False alarm < 3e-7.
* ``test_client_receives_flooded_fresh_ciphertexts``: every ciphertext the client receives
  decrypts, has at least sigma + log2 n bits less noise budget than a fresh encryption (flooded),
  and no two ciphertexts of the run (either direction) share their c1 polynomial.
"""
import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

import tiny
from cryptogen.driver import Driver
from cryptogen.mpc.arith import WIRE_BYTES
from cryptogen.plan import make_plan
from cryptogen.scheduler.inprocess import InProcessRunner
from cryptogen.twoparty import TAG_REFRESH, TAG_RESULT

from sec_helpers import binom_sf, ct_words, homogeneity_pvalue, signed, uniform_pvalue

PROMPT, OTHER, N_NEW, WORKERS = [3, 17], [200, 9], 2, 2
CLOSE_BITS = 24
ALPHA = 1e-7


def _model():
    """tests/tiny.py's model with one layer (half the run time; every stage still runs)."""
    return tiny.tiny_model(dataclasses.replace(tiny.TINY, n_layer=1))


@pytest.fixture(scope="module")
def runs():
    model = _model()
    cfg = model.config
    out = []
    for prompt in (PROMPT, PROMPT, OTHER):  # fresh keys, masks and dealer each time; the same public shapes
        plan = make_plan(cfg.n_layer, cfg.n_head, cfg.d_ff, WORKERS)
        runner = InProcessRunner(model, plan, prompt, record=True)
        Driver(runner, cfg, plan).generate(len(PROMPT), N_NEW)
        out.append(runner)
    return out


def _links(runner):
    return {w: (runner.client_parties[w].chan, runner.server_parties[w].chan) for w in runner.client_parties}


def _ciphertexts(chan):
    return [m for m in chan.transcript[1:] if m.dtype == np.uint8 and m.ndim == 1]


def test_transcripts_are_complete_and_classified(runs):
    for runner in runs:
        vocab = runner.client.cfg.vocab_size
        fp = runner.he_config.fixed_point
        logit_cols = 0
        for w, (cc, sc) in _links(runner).items():
            assert len(cc.opened) == len(sc.opened) > 0
            assert all(np.array_equal(a, b) for a, b in zip(cc.opened, sc.opened))
            for role, me, peer in (("client", cc, sc), ("server", sc, cc)):
                sent = sum(ph["msgs_sent"] for ph in peer.stats.as_dict().values())
                assert len(me.transcript) == sent, f"link {w}: {role} transcript misses messages"
                hs = me.transcript[0]
                assert hs.dtype == np.int64 and hs.shape == (4,) and hs[0] == (role == "client")
                assert (hs[2], hs[3]) == (fp.t, fp.frac_bits)
                kinds = Counter()
                for m in me.transcript[1:]:
                    if m.dtype == np.uint8 and m.ndim == 2 and m.shape[1] == WIRE_BYTES:
                        kinds["opened"] += 1
                    elif m.dtype == np.uint8 and m.ndim == 1 and m[0] in (TAG_RESULT, TAG_REFRESH):
                        runner.keys.ct_from_bytes(m[1:].tobytes())  # a ciphertext under the client's key
                        kinds["ciphertext"] += 1
                    elif role == "client" and m.dtype == np.int64 and m.ndim == 2 and m.shape[0] == 1:
                        assert m.min() >= 0 and m.max() < fp.t
                        logit_cols += m.shape[1]
                    else:
                        pytest.fail(f"link {w}: {role} received an unclassified message {m.dtype} {m.shape}")
                assert kinds["opened"] == len(me.opened) and kinds["ciphertext"] > 0
        assert logit_cols == N_NEW * vocab  # the logit shares of each generated token, nothing more


def test_openings_vary_between_runs(runs):
    a_links, b_links = _links(runs[0]), _links(runs[1])
    t = runs[0].he_config.t
    p0 = ((1 << (CLOSE_BITS + 1)) - 1) / t
    sites = [(w, i, a, b) for w in a_links
             for i, (a, b) in enumerate(zip(a_links[w][0].opened, b_links[w][0].opened))]
    assert [(w, i, a.shape) for w, i, a, _ in sites] == [(w, i, b.shape) for w, i, _, b in sites]
    assert len(a_links[0][0].opened) == len(b_links[0][0].opened)
    level = ALPHA / len(sites)
    for w, i, a, b in sites:
        close = int((np.abs(signed(a.ravel() - b.ravel(), t)) < (1 << CLOSE_BITS)).sum())
        p = binom_sf(close, a.size, p0)
        assert p > level, (f"link {w}, opening #{i} {a.shape}: {close} of {a.size} values nearly equal in two "
                           f"runs of the same prompt (p={p:.1e}): it depends on the data, not on a fresh mask")
        if a.size >= 640:
            pu = uniform_pvalue(a, t)
            assert pu > level, f"link {w}, opening #{i} {a.shape} is not uniform (p={pu:.1e})"


def test_client_receives_flooded_fresh_ciphertexts(runs):
    runner = runs[0]
    keys, cfg = runner.keys, runner.he_config
    fresh = keys.noise_budget(keys.encrypt(np.zeros(cfg.n, np.int64)))
    most = fresh - cfg.flood_sigma - math.log2(cfg.n)
    seen = {}
    for w, (cc, sc) in _links(runner).items():
        for role, chan in (("client", cc), ("server", sc)):
            for j, m in enumerate(_ciphertexts(chan)):
                ct = keys.ct_from_bytes(m[1:].tobytes())
                key = ct_words(ct)[1, :, :32].tobytes()
                assert key not in seen, f"two ciphertexts share c1: {seen.get(key)} and {(w, role, j)}"
                seen[key] = (w, role, j)
                if role == "client":
                    budget = keys.noise_budget(ct)
                    assert 0 < budget <= most, (f"link {w}: ciphertext #{j} to the client has a noise budget "
                                                f"of {budget} bits (fresh: {fresh}): not flooded")
    assert sum(1 for v in seen.values() if v[1] == "client") > 10


def test_two_prompts_give_the_same_opening_distribution(runs):
    """Run 1 (prompt A) against run 3 (prompt B, same length): the same sequence of opening shapes,
    and at every call site of >= 640 values the two samples pass a two-sample chi-square
    (homogeneity) at level 1e-7 / sites: what the parties see does not depend on the prompt."""
    a_links, b_links = _links(runs[0]), _links(runs[2])
    t = runs[0].he_config.t
    sites = [(w, i, a, b) for w in a_links
             for i, (a, b) in enumerate(zip(a_links[w][0].opened, b_links[w][0].opened))]
    assert [(w, i, a.shape) for w, i, a, _ in sites] == [(w, i, b.shape) for w, i, _, b in sites]
    big = [s for s in sites if s[2].size >= 640]
    assert len(big) > 3
    for w, i, a, b in big:
        p = homogeneity_pvalue(a, b, t)
        assert p > ALPHA / len(big), f"link {w}, opening #{i} {a.shape}: prompts A and B differ (p={p:.1e})"

