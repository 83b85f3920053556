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


@pytest.mark.parametrize("fails", ["weights", "config"])
def test_save_is_atomic_on_failure(tmp_path, monkeypatch, fails):
    """A save that fails AFTER writing part of a file leaves the previous checkpoint byte-identical
    (both files) and no temp file; a save that succeeds fsyncs each file before renaming it over its
    destination from the same folder, and fsyncs the folder after the renames.

    The failing writer writes half of its real bytes to the path it was given, then raises ENOSPC:
    the weights writer (``save_file``) or the config writer (``Path.write_text``), for a model of
    other shapes. Mutations caught: weights saved straight onto model.safetensors (both cases:
    half/new bytes land on the checkpoint; the old mock raised before writing and let this pass);
    the temp file not removed on failure (both); the weights renamed into place before config.json
    is written, as the old code did (the "config" case: new weights beside the old config);
    no fsync of the temp file before os.replace, or of the folder after (the first save's checks);
    the temp file made outside the destination folder (same-folder check)."""
    import os
    from pathlib import Path

    from safetensors.torch import save as serialize

    import cryptogen.model as m

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    old = GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    old.save_pretrained(tmp_path)
    monkeypatch.undo()
    folder = os.path.realpath(tmp_path)
    for name in ("model.safetensors", "config.json"):
        dst = os.path.join(folder, name)
        moves = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == dst]
        assert len(moves) == 1, f"{name} was not renamed into place exactly once: {events}"
        src = events[moves[0]][1]
        assert src != dst and os.path.dirname(src) == folder, f"{name} staged outside its folder: {src}"
        assert ("fsync", src) in events[:moves[0]], f"{name}: temp file not fsynced before os.replace"
    last_move = max(i for i, e in enumerate(events) if e[0] == "replace")
    assert ("fsync", folder) in events[last_move:], "folder not fsynced after the renames"

    names = ("model.safetensors", "config.json")
    before = {n: (tmp_path / n).read_bytes() for n in names}
    written = {}
    if fails == "weights":
        def half_then_fail(state, path, metadata=None):
            data = serialize(state, metadata=metadata)
            with open(path, "wb") as f:
                written[str(path)] = f.write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(m, "save_file", half_then_fail)
    else:
        real_write_text = Path.write_text

        def half_then_fail(self, data, *a, **k):
            written[str(self)] = real_write_text(self, data[:len(data) // 2], *a, **k)
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(Path, "write_text", half_then_fail)
    new = GPT(GPTConfig(vocab_size=64, n_positions=8, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(written) == 1 and list(written.values())[0] > 0  # it failed after writing bytes
    for n in names:
        assert (tmp_path / n).read_bytes() == before[n], f"{n} changed by a failed save"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names), "temp files left behind"
    assert GPT.from_pretrained(tmp_path).config == old.config
