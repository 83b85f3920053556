"""Shipped models and how a model name resolves to a checkpoint folder.

``--model NAME`` is a shipped model (``wikitext2``, ``ptb``, ``lambada``) or a path to any
folder with ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (a Hugging Face GPT-2
checkpoint with its tokenizer).
"""
from __future__ import annotations

import os
from pathlib import Path

MODELS_ENV = "CRYPTOGEN_MODELS"
SHIPPED = ("wikitext2", "ptb", "lambada")


class ModelNotFound(FileNotFoundError):
    pass


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path(__file__).resolve().parent.parent / "models")


def resolve_model(name: str) -> Path:
    path = Path(name)
    if name in SHIPPED or not path.exists():
        path = models_dir() / name
    if not path.is_dir():
        raise ModelNotFound(
            f"unknown model {name!r}: use one of {', '.join(SHIPPED)} or a folder with "
            "config.json, model.safetensors and tokenizer.json")
    return path


def checkpoint_folder(name: str) -> Path:
    """Absolute folder of a model, checked to hold everything a secure run reads (workers on other
    nodes and processes resolve it as given, so it must not be relative)."""
    folder = resolve_model(name).resolve()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise ModelNotFound(f"model folder {folder} has no {', '.join(missing)}")
    return folder


def load(name: str):
    """(model, tokenizer, folder) for a model name or folder."""
    from .model import GPT
    from .tokenizer import load_tokenizer

    folder = resolve_model(name)
    return GPT.from_pretrained(folder), load_tokenizer(folder), folder
