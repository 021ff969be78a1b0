"""Tokenizers by name: `byte` (the default, any UTF-8 text, vocabulary 257) and `tiktoken:<encoding>`.

Every tokenizer appends its own end-of-document id after each document; that id is the last of its
vocabulary (`vocab_size - 1`), which is where the runtime puts it (`plan.eod = vocab - 1`), so a model built
with `vocab = tokenizer.vocab_size` and the tokenizer agree on it.

tiktoken is an optional extra (`pip install nestc[tiktoken]`). It downloads an encoding's BPE file on first
use and caches it (in `TIKTOKEN_CACHE_DIR` when set); on a machine without network only encodings already in
that cache load, and any other gives a `TokenizerUnavailable` error naming the cause.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from ..errors import RuntimeInputError
from .data import ByteTokenizer

BYTE = "byte"
TIKTOKEN_PREFIX = "tiktoken:"


class Tokenizer(Protocol):
    """What training, evaluation and generation need of a tokenizer."""

    name: str
    vocab_size: int
    eod: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def byte_length(self, ids: Iterable[int]) -> int: ...


class TokenizerUnavailable(RuntimeInputError):
    """The tokenizer named cannot be used here (unknown name, tiktoken missing, encoding not available)."""


class TiktokenTokenizer:
    """A tiktoken encoding's ids, plus an end-of-document id one past its vocabulary."""

    def __init__(self, encoding_name: str, encoding: Any) -> None:
        self.name = TIKTOKEN_PREFIX + encoding_name
        self._encoding = encoding
        self.eod = int(encoding.n_vocab)
        self.vocab_size = self.eod + 1

    def encode(self, text: str) -> list[int]:
        """The encoding's ids of `text`; special-token text is encoded as ordinary text (the corpus is data)."""
        return list(self._encoding.encode(text, disallowed_special=()))

    def decode(self, ids: Iterable[int]) -> str:
        """Text from ids; the end-of-document id is skipped, invalid UTF-8 becomes U+FFFD."""
        return self._encoding.decode(self._checked(ids))

    def byte_length(self, ids: Iterable[int]) -> int:
        """How many UTF-8 bytes the ids stand for (the end-of-document id counts as one, as in `byte`)."""
        total = 0
        for token in ids:
            token = int(token)
            total += 1 if token == self.eod else len(self._encoding.decode_single_token_bytes(token))
        return total

    def _checked(self, ids: Iterable[int]) -> list[int]:
        kept = []
        for token in ids:
            token = int(token)
            if token == self.eod:
                continue
            if not 0 <= token < self.eod:
                raise RuntimeInputError(
                    f"token id {token} is outside the vocabulary of {self.name} (0..{self.eod})",
                    hint="decode only ids produced by a model trained with this tokenizer",
                )
            kept.append(token)
        return kept


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name`: `byte` or `tiktoken:<encoding>` (e.g. `tiktoken:cl100k_base`)."""
    if name == BYTE:
        return ByteTokenizer()
    if name.startswith(TIKTOKEN_PREFIX) and name[len(TIKTOKEN_PREFIX) :]:
        return _tiktoken(name[len(TIKTOKEN_PREFIX) :])
    raise TokenizerUnavailable(
        f"unknown tokenizer {name!r}", hint="use `byte` or `tiktoken:<encoding>`, e.g. tiktoken:cl100k_base"
    )


def _tiktoken(encoding_name: str) -> TiktokenTokenizer:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerUnavailable(
            "the tiktoken tokenizer needs the tiktoken package, which is not installed",
            hint="pip install 'nestc[tiktoken]', or use --tokenizer byte",
        ) from None
    known = tiktoken.list_encoding_names()
    if encoding_name not in known:
        raise TokenizerUnavailable(
            f"unknown tiktoken encoding {encoding_name!r}", hint=f"encodings: {', '.join(known)}"
        )
    try:
        encoding = tiktoken.get_encoding(encoding_name)
    except Exception as error:  # network and cache failures come as many types (requests, OSError, ValueError)
        raise TokenizerUnavailable(
            f"tiktoken could not load the encoding {encoding_name!r} ({type(error).__name__})",
            hint="it is downloaded on first use: run once with network access, or put its file in the cache that "
            "TIKTOKEN_CACHE_DIR names",
        ) from None
    return TiktokenTokenizer(encoding_name, encoding)
