"""What the CLI's command modules share (``cli.py`` and ``secure_cli.py`` both import this; neither
imports the other's internals)."""
from __future__ import annotations

import sys


class UsageError(ValueError):
    """Bad command-line input that the user can fix."""


def encode_prompt(tok, prompt: str, n_positions: int, max_new_tokens: int) -> list[int]:
    if not prompt.strip():
        raise UsageError("the prompt is empty; pass some text with --prompt")
    ids = tok.encode(prompt).ids
    if len(ids) + max_new_tokens > n_positions:
        raise UsageError(
            f"the prompt is {len(ids)} tokens and --max-new-tokens is {max_new_tokens}: together more than "
            f"the model's context of {n_positions}; shorten the prompt or ask for fewer tokens")
    return ids


class TokenStream:
    """Prints generated text as it comes (decoding the whole tail so multi-byte characters stay whole)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def close(self) -> None:
        """Flush whatever is left, even an incomplete multi-byte character."""
        text = self.tok.decode(self.ids)
        self.out.write(text[len(self.shown):] + "\n")
        self.out.flush()
        self.shown = text
