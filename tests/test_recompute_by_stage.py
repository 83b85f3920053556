"""scripts/recompute_by_stage.py end to end on the tiny model: one recompute step, then kv-reuse steps
on the caches it filled, in one process; the secure greedy tokens against the plaintext model's, and
the stage composition for the model's own layer count against the measured steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "recompute_by_stage.py"


def test_recompute_then_kv_reuse_on_its_caches(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--context", "6", "--tokens", "2",
                          "--compose", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [(s["mode"], s["position"]) for s in r["steps"]] == [("recompute", 6), ("kv-reuse", 7), ("kv-reuse", 8)]
    assert r["same_greedy"] is True  # 3 secure tokens (one per step) = plaintext greedy
    assert r["plaintext_tokens"] == [s["token"] for s in r["steps"]]
    assert all(s["same_argmax"] for s in r["steps"])
    assert 0 < r["max_logit_error"] <= 0.05  # against float64 on the same tokens (the suite's secure tolerance)
    for s in r["steps"]:
        assert set(s["stages"]) == {"embed", "layernorm", "attention", "mlp", "ln_f", "head"}
        assert abs(sum(s["stages"].values()) + s["outside_stages"] - s["seconds"]) < 0.05
    # composing the model's own 2 layers gives back the measured steps (up to the rounding of the stages)
    assert abs(r["composed"]["recompute_s"] - r["steps"][0]["seconds"]) < 0.1
    assert abs(r["composed"]["kv_reuse_s"][0] - r["steps"][1]["seconds"]) < 0.1
    assert r["ratio_measured"] > 1  # a 7-token pass against a 1-token step
    rc, kv1, kv2 = (s["ct_pt"] for s in r["steps"])  # the kv-reuse steps use the cache: far fewer HE products
    assert 0 < kv1 < rc / 2 and 0 < kv2 < rc / 2


def test_bad_context_is_one_line(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--context", "63", "--tokens", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "must stay below the model's 64 positions" in run.stderr
    assert "Traceback" not in run.stderr
