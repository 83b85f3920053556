"""CPU training of the small GPT-2 models shipped with the project.

A run folder holds the tokenizer, the encoded training ids and ``ckpt.pt`` (model,
optimiser, step, RNG state), written atomically every ``ckpt_every`` steps; ``resume``
continues from it. At the end the model is written as a Hugging Face checkpoint
(fp16 safetensors + config.json) with its tokenizer into ``out``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import load_text
from .model import GPT, GPTConfig
from .tokenizer import load_tokenizer, train_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "wikitext2"
    out: str = "models/wikitext2"
    run_dir: str = "runs/wikitext2"
    vocab_size: int = 4096
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 512
    block: int = 512
    batch: int = 8
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    ckpt_every: int = 100
    seed: int = 0
    threads: int = 0  # 0: torch default
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.block > self.n_positions:
            raise ValueError(f"block={self.block} exceeds n_positions={self.n_positions}")
        if self.steps <= 0 or self.batch <= 0:
            raise ValueError("steps and batch must be positive")


def _encoded_ids(cfg: TrainConfig, run: Path) -> np.ndarray:
    tok_file, ids_file = run / "tokenizer.json", run / "train_ids.npy"
    if ids_file.is_file() and tok_file.is_file():
        return np.load(ids_file)
    text = load_text(cfg.dataset, "train", cfg.data_dir)
    print(f"training a {cfg.vocab_size}-token byte-level BPE on {len(text):,} characters")
    tok = train_tokenizer(text, cfg.vocab_size, tok_file)
    ids = np.concatenate([np.asarray(e.ids, np.uint16) for e in tok.encode_batch(text.splitlines(keepends=True))])
    tmp = run / "train_ids.tmp.npy"
    np.save(tmp, ids)
    tmp.replace(ids_file)
    return ids


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _save_ckpt(run: Path, model, opt, step: int, gen: torch.Generator) -> None:
    tmp = run / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "rng": gen.get_state()}, tmp)
    os.replace(tmp, run / "ckpt.pt")


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ids = torch.from_numpy(_encoded_ids(cfg, run).astype(np.int64))
    mcfg = GPTConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                     n_layer=cfg.n_layer, n_head=cfg.n_head)
    model = GPT(mcfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume and (run / "ckpt.pt").is_file():
        state = torch.load(run / "ckpt.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step = state["step"]
        print(f"resuming from step {step}")
    (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {len(ids):,} training tokens")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.dataset}", unit="step")
    t0, loss_ema = time.time(), None
    while step < cfg.steps:
        starts = torch.randint(0, len(ids) - cfg.block - 1, (cfg.batch,), generator=gen)
        x = torch.stack([ids[s:s + cfg.block] for s in starts])  # (B, T)
        y = torch.stack([ids[s + 1:s + cfg.block + 1] for s in starts])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        logits, _ = model(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{_lr(cfg, step):.1e}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_ckpt(run, model, opt, step, gen)
    bar.close()
    print(f"trained {step} steps in {time.time() - t0:.0f} s, final loss {loss_ema:.3f}")
    return export(cfg, model.eval(), run)


def export(cfg: TrainConfig, model: GPT, run: Path) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json.tmp")
    os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    load_tokenizer(out)  # fail now, not at generation time, if it does not load
    (out / "training.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out
