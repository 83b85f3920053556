"""The plaintext reference model against transformers' GPT2LMHeadModel, and KV-cache decoding
against full recomputation. Tolerance: max |logit difference| <= 1e-4 (float32 both sides)."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cryptogen.model import GPT, CheckpointError, GPTConfig

SHAPES = [
    dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2),
    dict(vocab_size=300, n_positions=32, n_embd=96, n_layer=3, n_head=4),  # non power-of-two sizes
    dict(vocab_size=512, n_positions=128, n_embd=128, n_layer=1, n_head=8, n_inner=200),
]


def _hf_model(shape, seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(**shape, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make LayerNorm scales/biases and all biases non-trivial
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['n_embd']}L{s['n_layer']}H{s['n_head']}")
def test_logits_match_transformers(shape, tmp_path):
    hf = _hf_model(shape, seed=shape["n_embd"])
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    ours = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert (got - ref).abs().max().item() <= 1e-4


def test_our_checkpoint_loads_in_transformers(tmp_path):
    cfg = GPTConfig(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(1)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path, dtype=torch.float32)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["s0", "s1"])
def test_kv_cached_decoding_equals_recompute(shape):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape)).eval()
    seq = torch.randint(0, shape["vocab_size"], (1, 20))
    logits, cache = model.prefill(seq[:, :8])
    steps = [logits]
    for i in range(8, 20):
        logits, cache = model.decode_one_token(seq[:, i], cache)
        steps.append(logits)
    with torch.no_grad():
        full, _ = model(seq)
    for j, logits in enumerate(steps):
        assert torch.allclose(logits[0], full[0, 7 + j], atol=1e-5)


def test_context_overflow_is_an_error():
    model = GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_mismatched_checkpoint_is_rejected(tmp_path):
    GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match config"):
        GPT.from_pretrained(tmp_path)


def test_malformed_and_missing_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        GPT.from_pretrained(tmp_path)
    GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError):
        GPT.from_pretrained(tmp_path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import cryptogen.model as m

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(m, "save_file", boom)
    with pytest.raises(OSError):
        GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
