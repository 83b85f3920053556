"""Loaders for WikiText-2, PTB and LAMBADA from a local data folder.

The folder defaults to ``../shared/data`` beside the project (and beside the current
directory); ``--data-dir`` or the ``CRYPTOGEN_DATA`` environment variable point elsewhere.
Layout expected (see ../shared/data/README.md): ``wikitext-2/wiki.{train,valid,test}.tokens``,
``ptb/ptb.{train,valid,test}.txt``, ``lambada/lambada_test.jsonl`` and
``lambada/lambada_development_plain_text.txt``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "CRYPTOGEN_DATA"
EOS = "<|endoftext|>"

_FILES = {
    ("wikitext2", "train"): "wikitext-2/wiki.train.tokens",
    ("wikitext2", "valid"): "wikitext-2/wiki.valid.tokens",
    ("wikitext2", "test"): "wikitext-2/wiki.test.tokens",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("ptb", "valid"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("lambada", "train"): "lambada/lambada_development_plain_text.txt",
    ("lambada", "dev"): "lambada/lambada_development_plain_text.txt",
    # The shipped LAMBADA model trains on the original (lowercased, tokenized) release, so its
    # test split is the same release; "test-openai" is OpenAI's detokenized version (GPT-2's).
    ("lambada", "test"): "lambada/lambada_test_plain_text.txt",
    ("lambada", "test-openai"): "lambada/lambada_test.jsonl",
}
DATASETS = ("wikitext2", "ptb", "lambada")


class DataError(FileNotFoundError):
    """A data folder or file is missing or unreadable."""


def default_data_dir() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"


def data_path(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    if (dataset, split) not in _FILES:
        splits = sorted(s for d, s in _FILES if d == dataset)
        if not splits:
            raise DataError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
        raise DataError(f"data set {dataset!r} has no split {split!r}; choose one of {', '.join(splits)}")
    root = Path(data_dir) if data_dir else default_data_dir()
    path = root / _FILES[(dataset, split)]
    if not path.is_file():
        raise DataError(
            f"missing data file {path}; pass --data-dir DIR or set {DATA_ENV}=DIR to a folder "
            f"that holds {_FILES[(dataset, split)]}")
    return path


def load_text(dataset: str, split: str, data_dir=None) -> str:
    """A split as one training/evaluation text; documents/lines separated by newlines.

    PTB lines get an explicit end-of-sentence newline (the files have none); LAMBADA
    passages are separated by the end-of-text token.
    """
    path = data_path(dataset, split, data_dir)
    if dataset == "lambada":
        return f"\n{EOS}\n".join(p for p in _lambada_passages(path))
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line.strip() for line in lines if line.strip()) + "\n"


def first_tokens(tokenizer, dataset: str, n: int, split: str = "test", data_dir=None) -> list[int]:
    """The first ``n`` token ids of a split (fewer if the split is shorter): what the secure
    ``eval`` scores and the accuracy scripts measure. Only the text's head is encoded (400
    characters per token, far more than any tokenizer here needs for a token)."""
    return list(tokenizer.encode(load_text(dataset, split, data_dir)[: 400 * n]).ids[:n])


def _lambada_passages(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class LambadaExample:
    context: str
    target: str  # the last word, without the leading space


def lambada_examples(split: str = "test", data_dir=None, limit: int | None = None) -> list[LambadaExample]:
    """LAMBADA passages split into (context, last word)."""
    passages = _lambada_passages(data_path("lambada", split, data_dir))
    out = []
    for text in passages[:limit]:
        context, _, target = text.rpartition(" ")
        out.append(LambadaExample(context, target))
    return out
