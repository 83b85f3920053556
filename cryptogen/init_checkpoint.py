"""``cryptogen init``: a Hugging Face GPT-2 checkpoint of a named shape with GPT-2's own
initialisation, for benchmarks where the real weights are not obtainable (no downloads here).

The weights come from ``transformers.GPT2LMHeadModel(config)``, i.e. exactly GPT-2's
``_init_weights``: every linear and embedding weight N(0, 0.02), biases 0, LayerNorm 1/0, and
the residual projections (``attn.c_proj``, ``mlp.c_proj``) N(0, 0.02 / sqrt(2 n_layer)); the LM
head is tied to the token embedding. The folder is what ``save_pretrained`` writes
(``config.json`` + ``model.safetensors``), so it loads in ``transformers`` and in
``GPT.from_pretrained`` alike, like a real GPT-2 checkpoint. There is no tokenizer: the
benchmarks feed token ids.

Timing and memory only: the weights are random, so the text is meaningless and the activations
lack trained GPT-2's outliers (tests/secure covers those ranges separately).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# shape name -> GPT2Config fields (Radford et al. 2019, table 2; the Hugging Face hub's configs)
SHAPES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
}
DTYPES = ("float32", "float16")


class InitError(ValueError):
    """A bad request to ``init`` (shape, layers, output folder); the message says what to do."""


def check_out(out) -> Path:
    """The output folder must be new or empty: an existing checkpoint is never overwritten."""
    p = Path(out).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise InitError(f"--out {out} exists and is not an empty folder; pass a new folder (nothing was written)")
    return p


def shape_config(shape: str, layers: int | None = None) -> dict:
    if shape not in SHAPES:
        raise InitError(f"--shape {shape!r} is not known; choose one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise InitError(f"--layers must be an integer >= 1, got {layers!r}")
        cfg["n_layer"] = layers
    return cfg


def write(shape: str, out, layers: int | None = None, seed: int = 0, dtype: str = "float32") -> Path:
    """Write the checkpoint into ``out`` (new or empty) and return its path. The files are built in
    a temp folder beside ``out`` and renamed into place at the end: an interrupted run leaves
    nothing that looks like a checkpoint."""
    cfg = shape_config(shape, layers)
    if dtype not in DTYPES:
        raise InitError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    out = check_out(out)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(**cfg, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1)
    model = GPT2LMHeadModel(hf_cfg).to(getattr(torch, dtype)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.init-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for extra in tmp.iterdir():  # generation_config.json is not needed by either loader
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
        umask = os.umask(0)
        os.umask(umask)
        for f in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700: give the usual permissions
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
