"""CLI, data loaders and tokenizers: real behaviour and one-line errors for bad input."""
import pytest
import torch
from typer.testing import CliRunner

from cryptogen.cli import app
from cryptogen.data import DataError, data_path, first_tokens, lambada_examples, load_text
from cryptogen.model import GPT, GPTConfig
from cryptogen.tokenizer import load_tokenizer, train_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + BPE tokenizer trained here on a few lines of WikiText-2."""
    folder = tmp_path_factory.mktemp("tiny")
    text = load_text("wikitext2", "valid")[:200_000]
    train_tokenizer(text, 300, folder / "tokenizer.json")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


def test_data_loaders_read_the_shared_copies():
    assert load_text("wikitext2", "test").startswith("= Robert <unk> =\nRobert <unk> is an English film")
    assert load_text("ptb", "valid").count("\n") == 3370
    ex = lambada_examples("test", limit=3)
    assert len(ex) == 3 and ex[0].target and " " not in ex[0].target


def test_first_tokens_equal_the_head_of_the_whole_encoding(repo_root):
    """first_tokens encodes only the text's head; its ids are those of encoding the whole split."""
    tok = load_tokenizer(repo_root / "models" / "wikitext2")
    whole = tok.encode(load_text("wikitext2", "test")[:200000]).ids  # far past 700 tokens of this text
    for n in (1, 37, 700):
        assert first_tokens(tok, "wikitext2", n) == whole[:n]
    ptb = tok.encode(load_text("ptb", "valid")).ids
    assert len(ptb) < 10**6 and first_tokens(tok, "ptb", 10**6, split="valid") == ptb  # a shorter split: all of it


def test_missing_data_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CRYPTOGEN_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        data_path("ptb", "test")
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(e.value) and "--data-dir" in str(e.value)
    r = runner.invoke(app, ["eval", "--model", "wikitext2", "--data", "ptb"])
    assert r.exit_code == 2 and "missing data file" in r.output and "Traceback" not in r.output


def test_tokenizer_roundtrip(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    s = "The game 's battle system , the BliTZ system , is carried over ."
    assert tok.decode(tok.encode(s).ids) == s
    assert tok.get_vocab_size() == 300


def test_generate_streams_text_from_a_checkpoint_folder(tiny_model_dir):
    r = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompt", "The game",
                            "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("The game") and len(r.stdout) > len("The game\n")
    r2 = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompt", "The game",
                             "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "3"])
    assert r2.stdout == r.stdout  # the seed makes sampling reproducible


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "the prompt is empty"),
    (["--prompt", "word " * 40], "more than the model's context of 32"),
    (["--prompt", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_generate_bad_input_is_one_line(tiny_model_dir, args, message):
    if "--model" not in args:
        args = args + ["--model", str(tiny_model_dir)]
    r = runner.invoke(app, ["generate"] + args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_eval_reports_perplexity(tiny_model_dir):
    r = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", "wikitext2", "--max-tokens", "200"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output


def test_shipped_wikitext2_model_generates(repo_root):
    folder = repo_root / "models" / "wikitext2"
    model = GPT.from_pretrained(folder)
    tok = load_tokenizer(folder)
    r = runner.invoke(app, ["generate", "--model", "wikitext2", "--prompt", "The history of", "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    assert model.config.n_positions == 512 and tok.get_vocab_size() == model.config.vocab_size
    assert sum((folder / f).stat().st_size for f in ("model.safetensors", "tokenizer.json")) <= 12 * 2**20


def test_secure_generate_checks_the_checkpoint_before_starting(tiny_model_dir, tmp_path):
    """The user's process reads only config.json and the tokenizer (the workers load the weights);
    a folder without weights is a one-line error before Ray or key generation starts."""
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    r = runner.invoke(app, ["generate", "--secure", "--prompt", "hi", "--model", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"model folder {tmp_path.resolve()} has no model.safetensors" in r.output
    r = runner.invoke(app, ["generate", "--secure", "--prompt", "word " * 40, "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "more than the model's context of 32" in r.output
