"""``cryptogen init``: a GPT-2-shaped checkpoint with GPT-2's initialisation (issue #11), and real
GPT-2 checkpoints in the hub's own layout still load.

References: ``transformers.GPT2LMHeadModel`` on the same files (logits within 1e-4, float32), and
GPT-2's documented initialisation (N(0, 0.02); residual projections N(0, 0.02/sqrt(2 n_layer));
biases 0; LayerNorm 1, 0), checked on the sample standard deviations within 3%.
"""
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from cryptogen.init_checkpoint import InitError, write
from cryptogen.model import GPT

IDS = torch.tensor([[50256, 464, 2068, 7586, 21831, 18045, 625, 262]])


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return write("gpt2", tmp_path_factory.mktemp("init") / "gpt2-1", layers=1, seed=0)


def test_shape_and_logits_match_transformers(one_layer):
    ours = GPT.from_pretrained(one_layer)
    c = ours.config
    assert (c.n_embd, c.n_head, c.n_layer, c.vocab_size, c.n_positions) == (768, 12, 1, 50257, 1024)
    hf = GPT2LMHeadModel.from_pretrained(one_layer).eval()
    with torch.no_grad():
        ref = hf(IDS).logits[0]
        got = ours(IDS)[0][0]
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


def test_weights_follow_gpt2_initialisation(one_layer):
    t = load_file(str(one_layer / "model.safetensors"))
    n_layer = 1

    def std(name):
        return t[name].float().std().item()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.0.mlp.c_fc.weight"):
        assert std(name) == pytest.approx(0.02, rel=0.03), name
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
        assert std(name) == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.03), name
    assert all(float(t[k].abs().max()) == 0 for k in t if k.endswith(".bias") and "attn.bias" not in k)
    assert all(bool((t[k] == 1).all()) for k in t if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")))
    assert "lm_head.weight" not in t  # tied to the token embedding, as in GPT-2


def test_hub_layout_still_loads(one_layer, tmp_path):
    """The hub's gpt2 files name tensors without ``transformer.`` and carry the causal-mask buffers
    ``h.N.attn.bias``; both must load as before, to the same logits."""
    t = load_file(str(one_layer / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in t.items()}
    hub["h.0.attn.bias"] = torch.tril(torch.ones(1024, 1024)).view(1, 1, 1024, 1024)
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((one_layer / "config.json").read_text())
    a, b = GPT.from_pretrained(one_layer), GPT.from_pretrained(tmp_path)
    for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert ka == kb and torch.equal(va, vb), ka


def test_bad_requests_write_nothing(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "model.safetensors").write_bytes(b"old")
    with pytest.raises(InitError, match="not an empty folder"):
        write("gpt2", kept, layers=1)
    assert [p.name for p in kept.iterdir()] == ["model.safetensors"] and (kept / "model.safetensors").read_bytes() == b"old"
    with pytest.raises(InitError, match="choose one of"):
        write("gpt5", tmp_path / "x")
    with pytest.raises(InitError, match="--layers"):
        write("gpt2", tmp_path / "x", layers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_cli_refuses_an_existing_checkpoint_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "cryptogen.cli", "init", "--out", str(tmp_path), "--layers", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not an empty folder" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and [p.name for p in tmp_path.iterdir()] == ["config.json"]
