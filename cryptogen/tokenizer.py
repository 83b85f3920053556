"""Byte-level BPE tokenizers (Hugging Face ``tokenizers``), one per data set.

Any Hugging Face ``tokenizer.json`` loads through ``load_tokenizer``.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from .data import EOS


class TokenizerError(ValueError):
    pass


def train_tokenizer(text: str, vocab_size: int, out_file: Path) -> Tokenizer:
    """Train a byte-level BPE on ``text``; the end-of-text token is the last id."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(_chunks(text), vocab_size=vocab_size - 1, min_frequency=2,
                            special_tokens=[], show_progress=False)
    bpe.add_special_tokens([EOS])
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".json.tmp")
    bpe.save(str(tmp))
    tmp.replace(out_file)
    return load_tokenizer(out_file)


def _chunks(text: str, size: int = 1 << 16):
    for i in range(0, len(text), size):
        yield text[i:i + size]


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file at {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
