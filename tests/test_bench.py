"""``cryptogen bench`` end to end on a tiny random checkpoint (no tokenizer): the in-process backend,
and the ray backend (a local ``cryptogen serve`` in its own process, this process its client)."""
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from cryptogen.cli import app
from cryptogen.model import GPT, GPTConfig

pytestmark = pytest.mark.slow

TINY = GPTConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bench-model")
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(folder)  # config.json + model.safetensors only: bench needs no tokenizer
    return folder


def bench(*args):
    return CliRunner().invoke(app, ["bench", *map(str, args)])


def test_bench_reports_both_modes_counts_memory_and_plots(checkpoint, tmp_path):
    out = tmp_path / "bench" / "bench.json"
    res = bench("--model", checkpoint, "--contexts", "2,5", "--tokens", 1, "--workers", 1,
                "--sweep-backend", "inprocess", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["cpu_model"] and meta["date"]
    assert meta["command"].startswith("cryptogen bench") and "--contexts 2,5" in meta["command"]
    rows = report["contexts"]
    assert [r["context"] for r in rows] == [2, 5]
    for r in rows:
        for mode in ("kv-reuse", "recompute"):
            m = r[mode]
            assert len(m["decode_s"]) == 1 and m["median_decode_s"] > 0
            ops = m["he_ops_per_token"]  # this shape's plans need no rotation (the folds are in shares)
            # the attention is ct x pt too (docs/HE.md, "Attention by ct x pt"): no ciphertext products
            assert ops["ct_pt_mul"] > 0 and ops["ct_ct_mul"] == 0 and ops["rotations"] >= 0
            assert m["bytes_per_token"]["to_server"] > 0 and m["bytes_per_token"]["to_client"] > 0
            assert m["rounds_per_token"] > 0
        assert r["ratio"] > 0
        # recompute re-runs the whole prefix: strictly more HE work per token than kv-reuse
        assert r["recompute"]["he_ops_per_token"]["ct_pt_mul"] > r["kv-reuse"]["he_ops_per_token"]["ct_pt_mul"]
    # kv-reuse grew one session's cache: context 5 prefilled only the 2 tokens after 2 + 1 decoded
    assert [r["kv-reuse"]["prefill_tokens"] for r in rows] == [2, 2]
    kv_short, kv_long = rows[0]["kv_cache"], rows[1]["kv_cache"]
    # allocation is whole ciphertexts (tokens_per_ciphertext >> 5 here); the occupied bytes grow with context
    assert 0 < kv_short["bytes"] <= kv_long["bytes"] and kv_short["ciphertexts"] > 0
    assert kv_long["bytes_used"] > kv_short["bytes_used"] > 0
    assert kv_short["marginal_bytes_per_token_per_layer"] == kv_long["marginal_bytes_per_token_per_layer"] > 0
    # recompute work grows with context; kv-reuse linear-layer work does not
    assert (rows[1]["recompute"]["he_ops_per_token"]["ct_pt_mul"]
            > rows[0]["recompute"]["he_ops_per_token"]["ct_pt_mul"])
    assert rows[1]["kv-reuse"]["he_ops_per_token"]["ct_pt_mul"] == rows[0]["kv-reuse"]["he_ops_per_token"]["ct_pt_mul"]
    assert [s["workers"] for s in report["workers"]] == [1] and report["workers"][0]["speedup"] == 1.0
    for name in ("bench.md", "latency.png", "memory.png"):
        path = out.parent / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out.parent / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out.parent / "bench.md").read_text()
    assert "| 2 |" in md and "| 5 |" in md and "recompute / kv-reuse" in md and md in res.output


def test_recompute_beyond_limit_is_marked_skipped(checkpoint, tmp_path):
    out = tmp_path / "b.json"
    res = bench("--model", checkpoint, "--contexts", "2", "--tokens", 1, "--workers", 1,
                "--sweep-backend", "inprocess", "--recompute-max-context", 1, "--out", out)
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["contexts"][0]
    assert row["recompute"] == {"skipped": "too slow (--recompute-max-context)"} and row["ratio"] is None
    assert "skipped: too slow" in (tmp_path / "b.md").read_text()


def test_ray_backend_measures_a_local_server(checkpoint, tmp_path):
    out = tmp_path / "ray" / "bench.json"
    res = bench("--model", checkpoint, "--ray", "--contexts", 2, "--tokens", 1, "--workers", 1,
                "--recompute-max-context", 0, "--sweep-backend", "ray", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["meta"]["backend"] == "ray" and any("ray backend" in n for n in report["meta"]["notes"])
    (row,) = report["contexts"]
    m = row["kv-reuse"]
    assert len(m["decode_s"]) == 1 and m["median_decode_s"] > 0 and m["prefill_s"] > 0
    # HE ops and the KV cache come from the server's metrics endpoint, bytes and rounds from the client
    ops = m["he_ops_per_token"]
    assert ops["ct_pt_mul"] > 0 and ops["ct_ct_mul"] == 0 and ops["rotations"] >= 0  # attention by ct x pt
    assert m["bytes_per_token"]["to_server"] > 0 and m["bytes_per_token"]["to_client"] > 0 and m["rounds_per_token"] > 0
    assert row["kv_cache"]["bytes"] > 0 and row["kv_cache"]["ciphertexts"] > 0
    # CPU per party: this process (client), the server's worker actors, its gateway, Ray's own processes
    cpu = m["cpu_s_per_token"]
    assert set(cpu) == {"client", "workers", "gateway", "ray"} and cpu["client"] > 0 and cpu["workers"] > 0
    assert row["recompute"] == {"skipped": "too slow (--recompute-max-context)"}
    (sweep,) = report["workers"]  # the sweep point (1 worker, context 2) is the table's, measured once
    assert sweep["backend"] == "ray" and sweep["speedup"] == 1.0 and sweep["cpu_s_per_token"] == cpu
    md = (out.parent / "bench.md").read_text()
    assert "client / workers / gateway / ray" in md


@pytest.mark.parametrize("args, message", [
    (["--contexts", "4,16", "--tokens", 1], "context 16 + 1 decode token(s) exceed the model's context of 16"),
    (["--contexts", "14", "--tokens", 3], "context 14 + 3 decode token(s) exceed"),
    (["--contexts", "4,x"], "--contexts must be comma-separated integers"),
    (["--contexts", "4", "--workers", "3"], "3 workers share a layer but it has only 2 heads"),
])
def test_bad_input_errors_before_any_work(checkpoint, tmp_path, args, message):
    out = tmp_path / "never" / "bench.json"
    t0 = time.monotonic()
    res = bench("--model", checkpoint, *args, "--out", out)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert time.monotonic() - t0 < 10 and not out.parent.exists()  # no keys, no encoding, no files


@pytest.mark.parametrize("mode", ["kv-reuse", "recompute"])
def test_in_process_dealer_makes_each_decode_steps_items_before_it(checkpoint, monkeypatch, mode):
    """After a decode step the dealer makes what it took for the next step, untimed (as the deployed
    client's offline phase): the first decode step makes its items on demand (dealer_ahead_s 0), every
    later one finds them all made (nothing produced inside it) and the dealer's seconds are reported."""
    from cryptogen import bench as bench_mod
    from cryptogen.driver import Driver

    backend = bench_mod.InProcessBackend(GPT.from_pretrained(checkpoint), 1)
    made_inside = []
    real = Driver.decode_one_token

    def counted(self, position):
        before = sum(sum(p.cr.produced.values()) for p in backend.runner.client_parties.values())
        timing = real(self, position)
        made_inside.append(sum(sum(p.cr.produced.values()) for p in backend.runner.client_parties.values()) - before)
        return timing

    monkeypatch.setattr(Driver, "decode_one_token", counted)
    try:
        res = backend.run(mode, list(range(1, 6)), 3, lambda timing: None)
    finally:
        backend.close()
    assert len(res["decode_s"]) == len(res["dealer_ahead_s"]) == 3
    assert res["dealer_ahead_s"][0] == 0 and made_inside[0] > 0
    assert all(s > 0 for s in res["dealer_ahead_s"][1:]) and made_inside[1:] == [0, 0]
