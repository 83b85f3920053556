"""Plaintext reference GPT-2 (pre-LN, tanh GELU, learned positions, tied embeddings).

The secure path is checked against this file, and this file against Hugging Face's
``GPT2LMHeadModel``. Parameter names and layouts are exactly Hugging Face's (``Conv1D``
weights are ``[in, out]``: ``y = x @ W + b``), so ``config.json`` + ``model.safetensors``
checkpoints load and save without renaming.

Decoding has two entry points, as in gpt-fast: ``prefill`` (all prompt tokens at once,
fills the KV cache) and ``decode_one_token`` (one token against the cache).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, or does not match its config."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 4096
    n_positions: int = 512
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_inner: int | None = None  # None: 4 * n_embd, as GPT-2
    layer_norm_epsilon: float = 1e-5
    # public bound on |x - mean| of a LayerNorm input that the secure LayerNorm holds (beyond it, it
    # saturates); None: by width (``ln_range``). Not a Hugging Face field; transformers ignores it.
    secure_ln_range: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"config {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise CheckpointError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        r = self.secure_ln_range
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 1 <= r <= 65536):
            raise CheckpointError(f"config secure_ln_range must be a number in [1, 65536], got {r!r}")

    @property
    def ln_range(self) -> float:
        """The secure LayerNorm's |x - mean| bound: 4096 from GPT-2 base's width on (trained GPT-2
        residual streams carry "massive activations" of ~3000 in a few dimensions; the wide path,
        mpc/layernorm.py), 256 below (our small models stay under 20; the cheaper narrow path)."""
        if self.secure_ln_range is not None:
            return float(self.secure_ln_range)
        return 4096.0 if self.n_embd >= 768 else 256.0

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def to_hf(self) -> dict:
        """The fields of a Hugging Face GPT2Config for this shape."""
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size, "n_positions": self.n_positions, "n_ctx": self.n_positions,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
            "n_inner": self.n_inner, "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": self.vocab_size - 1, "eos_token_id": self.vocab_size - 1,
            **({} if self.secure_ln_range is None else {"secure_ln_range": self.secure_ln_range}),
        }

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPTConfig":
        act = cfg.get("activation_function", "gelu_new")
        if cfg.get("model_type", "gpt2") != "gpt2" or act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(
                f"unsupported config (model_type={cfg.get('model_type')!r}, activation={act!r}); "
                "only GPT-2 checkpoints with the tanh GELU are supported")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: cfg[k] for k in names if k in cfg})
        except TypeError as e:
            raise CheckpointError(f"config.json is malformed: {e}") from None


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear layer: weight is [in, out]."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, past: tuple | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (z.view(B, T, self.n_head, self.d_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, T_past + T, hd)
            v = torch.cat([past[1], v], dim=2)
        # Causal: query i (absolute position P + i) sees keys 0..P+i.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, k.shape[2], x.device))
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y), (k, v)


def _causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    offset = t_k - t_q
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=offset)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.d_ff)
        self.c_proj = Conv1D(cfg.d_ff, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu_tanh(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, past: tuple | None = None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class Transformer(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)


KVCache = list  # per layer: (k, v), each (B, H, T, d_head)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, V) and the updated cache."""
        B, T = idx.shape
        start = 0 if not cache else cache[0][0].shape[2]
        if start + T > self.config.n_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.n_positions}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        presents = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, cache[i] if cache else None)
            presents.append(present)
        x = self.transformer.ln_f(x)
        return x @ self.transformer.wte.weight.T, presents  # (B, T, V) tied LM head

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor):
        """All prompt tokens at once: logits of the last position (B, V) and the KV cache."""
        logits, cache = self(idx)
        return logits[:, -1], cache

    @torch.no_grad()
    def decode_one_token(self, token: torch.Tensor, cache: KVCache):
        """token (B,) against the cache: next logits (B, V) and the grown cache."""
        logits, cache = self(token.view(-1, 1), cache)
        return logits[:, -1], cache

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, choose):
        """Yield ``max_new_tokens`` tokens after ``ids``: prefill, then cached decode steps;
        ``choose(logits (V,) numpy) -> int`` picks each token (greedy, sampling)."""
        if not ids:
            raise ValueError("the prompt has no tokens")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens - 1 > self.config.n_positions:
            raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context "
                             f"of {self.config.n_positions}")
        return self._generate(ids, max_new_tokens, choose)

    def _generate(self, ids: list[int], max_new_tokens: int, choose):
        logits, cache = self.prefill(torch.tensor([ids]))
        for i in range(max_new_tokens):
            token = choose(logits[0].numpy())
            yield token
            if i + 1 < max_new_tokens:
                logits, cache = self.decode_one_token(torch.tensor([token]), cache)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def random(cls, cfg: GPTConfig, seed: int, weight_scale: float = 1.0) -> "GPT":
        """A seeded random model (eval mode) with every weight matrix times ``weight_scale``: the
        shapes of tests and accuracy scripts (x 2 makes attention less uniform)."""
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(weight_scale)
        return model

    # --- Hugging Face checkpoints -------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
        """Write config.json + model.safetensors atomically: both are written in full to temp files in
        ``folder`` and fsynced, and only then renamed over the old ones (os.replace), the folder fsynced
        last. A failure while writing either (disk full, an exception) leaves the previous checkpoint
        byte-identical, both files, and no temp file behind."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        staged = []
        try:
            staged.append(_stage(folder / "model.safetensors",
                                 lambda p: save_file(state, p, metadata={"format": "pt"})))
            staged.append(_stage(folder / "config.json",
                                 lambda p: Path(p).write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")))
            for tmp, path in staged:
                os.replace(tmp, path)
        except BaseException:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(folder, directory=True)  # the renames themselves survive a crash

    @staticmethod
    def read_config(folder: str | os.PathLike) -> GPTConfig:
        """The checkpoint's (public) shapes from config.json, without reading any weight."""
        path = Path(folder) / "config.json"
        try:
            return GPTConfig.from_hf(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e.__class__.__name__}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "GPT":
        folder = Path(folder)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise CheckpointError(f"checkpoint folder {folder} has no {name}")
        try:
            cfg = GPTConfig.from_hf(json.loads((folder / "config.json").read_text()))
            tensors = load_file(str(folder / "model.safetensors"))
        except (json.JSONDecodeError, OSError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"cannot read checkpoint in {folder}: {e.__class__.__name__}: "
                                  f"{str(e).splitlines()[0][:120]}") from None
        model = cls(cfg)
        model.load_hf_state(tensors)
        return model.eval()

    def load_hf_state(self, tensors: dict) -> None:
        """Accepts keys with or without the 'transformer.' prefix; ignores masks and lm_head (tied)."""
        want = self.state_dict()
        state = {}
        for key, value in tensors.items():
            name = key if key.startswith("transformer.") else f"transformer.{key}"
            if name.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue
            state[name] = value
        missing = sorted(set(want) - set(state))
        if missing:
            raise CheckpointError(f"checkpoint does not match config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name, value in state.items():
            if name not in want:
                raise CheckpointError(f"checkpoint does not match config: unexpected tensor {name}")
            if tuple(value.shape) != tuple(want[name].shape):
                raise CheckpointError(
                    f"checkpoint does not match config: {name} has shape {tuple(value.shape)}, "
                    f"config implies {tuple(want[name].shape)}")
        self.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})


def _stage(path: Path, write) -> tuple[str, Path]:
    """``write(tmp)`` to a temp file beside ``path`` (same folder: same file system, so os.replace is
    atomic), fsynced; returns (tmp, path). On failure the temp file is removed and ``path`` untouched."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o644)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp, path


def _fsync(path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # a platform that cannot open a folder (Windows): nothing to sync
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
