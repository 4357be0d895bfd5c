"""How `selfattn explain` turns text into tokens.

The rule (``tokenize``): a token is either a maximal run of word characters -- letters and
digits of any script, and the underscore (Python's ``\\w``) -- or one single character that is
neither a word character nor whitespace (a punctuation mark, a symbol, an emoji). Whitespace
only separates tokens and is dropped. Case is kept, so "The" and "the" are different tokens.

    "The cat sat."      -> ["The", "cat", "sat", "."]
    "Don't stop!!"      -> ["Don", "'", "t", "stop", "!", "!"]
    "x_1 = 2.5"         -> ["x_1", "=", "2", ".", "5"]

Character-level checkpoints use ``characters``: every character is a token, spaces included.
"""

from __future__ import annotations

import re

TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list:
    """Split ``text`` into words and single punctuation marks (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return TOKEN_RE.findall(text)


def characters(text: str) -> list:
    """Every character of ``text`` is one token (for character-level models)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return list(text)


TOKENIZERS = {"words": tokenize, "chars": characters}
