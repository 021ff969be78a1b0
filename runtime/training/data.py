"""Training data: the byte-level tokenizer, corpus loading, a deterministic batch sampler and the loss.

The default tokenizer works on any text: every UTF-8 byte is a token (ids 0..255) and id 256 (`EOD`) ends a
document, so the vocabulary has 257 entries. A corpus is a text file or a folder of text files; each file is one
document followed by `EOD`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import RuntimeInputError

log = logging.getLogger(__name__)

EOD = 256
"""The end-of-document token id of the byte tokenizer."""

BYTE_VOCAB = 257
"""Vocabulary size of the byte tokenizer: 256 byte ids plus `EOD`."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""How many bytes of text `load_corpus` reads at most unless told otherwise."""

_IGNORE = -100


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus an end-of-document id."""

    name = "byte"
    vocab_size = BYTE_VOCAB
    eod = EOD

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as token ids (no `EOD` is added)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Text from token ids; `EOD` is skipped and invalid UTF-8 sequences become U+FFFD."""
        data = bytearray()
        for token in ids:
            token = int(token)
            if token == EOD:
                continue
            if not 0 <= token < 256:
                raise RuntimeInputError(
                    f"token id {token} is outside the byte vocabulary (0..{BYTE_VOCAB - 1})",
                    hint="decode only ids produced by a model with the byte tokenizer",
                )
            data.append(token)
        return data.decode("utf-8", errors="replace")

    def byte_length(self, ids: Iterable[int]) -> int:
        """How many bytes the ids stand for: one each (`EOD` included, so bits per byte = bits per token)."""
        return sum(1 for _ in ids)


class _TextTokenizer(Protocol):
    eod: int

    def encode(self, text: str) -> list[int]: ...


def load_corpus(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, tokenizer: _TextTokenizer | None = None
) -> torch.Tensor:
    """Read a text file or a folder of text files as one 1-D LongTensor of tokens (bytes unless `tokenizer`).

    A folder is walked recursively in path order; hidden entries (names starting with ".") and files that are
    not UTF-8 text are skipped. Each document is followed by the end-of-document id (`EOD`, or the
    tokenizer's). At most `max_bytes` bytes of text are read: the document that crosses the limit is cut (at a
    character boundary) and later files are ignored.
    """
    root = Path(path)
    if max_bytes <= 0:
        raise RuntimeInputError(f"max_bytes must be positive, got {max_bytes}", path=str(root))
    if not root.exists():
        raise RuntimeInputError(
            "corpus not found", path=str(root), hint="give a text file or a folder that contains text files"
        )
    documents = _read_documents(root, max_bytes)
    if not documents:
        raise RuntimeInputError(
            "the corpus is empty (no non-empty UTF-8 text files)",
            path=str(root),
            hint="give a text file or a folder that contains text files",
        )
    end = torch.tensor([EOD if tokenizer is None else tokenizer.eod], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    for document in documents:
        if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
            pieces.append(torch.frombuffer(bytearray(document), dtype=torch.uint8).to(torch.long))
        else:
            pieces.append(torch.tensor(tokenizer.encode(document.decode("utf-8")), dtype=torch.long))
        pieces.append(end)
    return torch.cat(pieces)


def _read_documents(root: Path, max_bytes: int) -> list[bytes]:
    """The text documents under `root` (a file or a folder), within the byte budget."""
    if root.is_file():
        data = _read_limited(root, max_bytes)
        if not _is_text(data, truncated=root.stat().st_size > max_bytes):
            raise RuntimeInputError(
                "the corpus file is not UTF-8 text", path=str(root), hint="convert it to UTF-8 first"
            )
        return [_trim_partial_char(data)] if data else []
    documents: list[bytes] = []
    budget = max_bytes
    for file in _text_candidates(root):
        if budget <= 0:
            log.warning("corpus %s: stopped after %d bytes (max_bytes); later files are ignored", root, max_bytes)
            break
        data = _read_limited(file, budget)
        truncated = file.stat().st_size > budget
        if not data or not _is_text(data, truncated=truncated):
            continue
        if truncated:
            data = _trim_partial_char(data)
            budget = 0
        else:
            budget -= len(data)
        documents.append(data)
    return documents


def _text_candidates(root: Path) -> list[Path]:
    """Every regular, non-hidden file under `root`, sorted by path."""
    found: list[Path] = []
    try:
        for folder, dirs, files in os.walk(root, onerror=_raise_walk_error):
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            found.extend(Path(folder) / name for name in files if not name.startswith("."))
    except OSError as error:
        raise RuntimeInputError(f"cannot read the corpus folder: {error.strerror}", path=str(root)) from None
    return sorted(file for file in found if file.is_file())


def _raise_walk_error(error: OSError) -> None:
    raise error


def _read_limited(file: Path, limit: int) -> bytes:
    """At most `limit` bytes from the start of `file`."""
    try:
        with open(file, "rb") as handle:
            return handle.read(limit)
    except OSError as error:
        raise RuntimeInputError(
            f"cannot read the corpus file: {error.strerror}",
            path=str(file),
            hint="check the file's permissions",
        ) from None


def _is_text(data: bytes, *, truncated: bool) -> bool:
    """Whether `data` is UTF-8 text (no NUL bytes); a cut-off tail of a truncated read is allowed."""
    if b"\x00" in data:
        return False
    try:
        _trim_partial_char(data) if truncated else data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _trim_partial_char(data: bytes) -> bytes:
    """`data` without an incomplete UTF-8 character at its end (raises if it is not UTF-8 otherwise)."""
    for cut in range(4):
        candidate = data[: len(data) - cut] if cut else data
        try:
            candidate.decode("utf-8")
        except UnicodeDecodeError:
            continue
        return candidate
    data.decode("utf-8")  # re-raise the error of the untrimmed text
    return data


def split_holdout(tokens: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (training head, held-out tail); the tail has `fraction` of the tokens."""
    if not 0.0 <= fraction < 1.0:
        raise RuntimeInputError(
            f"the held-out fraction must be in [0, 1), got {fraction}", hint="for example holdout=0.05"
        )
    held = round(tokens.numel() * fraction)
    if fraction > 0.0:
        held = max(held, 1)
    cut = tokens.numel() - held
    return tokens[:cut], tokens[cut:]


class BatchSampler:
    """Random crops of `seq_len + 1` tokens, drawn from its own seeded `torch.Generator`.

    The sampler's whole state is the generator's state, so `state_dict()` / `load_state_dict()` resume the
    exact same sequence of batches.
    """

    def __init__(self, tokens: torch.Tensor, batch: int, seq_len: int, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if batch < 1 or seq_len < 1:
            raise RuntimeInputError(f"batch and seq_len must be at least 1, got batch={batch}, seq_len={seq_len}")
        if tokens.numel() < seq_len + 1:
            raise RuntimeInputError(
                f"the corpus has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}",
                hint="use a longer corpus or a smaller seq_len",
            )
        self.tokens = tokens.to(torch.long)
        self.batch = batch
        self.seq_len = seq_len
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def next(self) -> torch.Tensor:
        """A LongTensor (batch, seq_len + 1) of crops starting at random positions."""
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch,), generator=self.generator)
        return self.tokens[starts[:, None] + self._offsets]

    __next__ = next

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state: the generator state (a uint8 tensor) and its settings."""
        return {
            "generator": self.generator.get_state(),
            "batch": self.batch,
            "seq_len": self.seq_len,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state saved by `state_dict()`; batch and seq_len must match."""
        for key in ("batch", "seq_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise RuntimeInputError(
                    f"the saved sampler has {key}={state[key]} but this run uses {getattr(self, key)}",
                    hint=f"resume with the same {key} as the saved run",
                )
        generator = state["generator"]
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise RuntimeInputError("the saved sampler state is not a generator state (uint8 tensor)")
        self.generator.set_state(generator.clone())
        self.seed = int(state.get("seed", self.seed))


def next_token_loss(logits: torch.Tensor, window: torch.Tensor, eod: int = EOD) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` (B, T, V) for a window (B, T + 1).

    Inputs are `window[:, :-1]` and labels `window[:, 1:]`. A position whose input token is `eod` has no label:
    the end-of-document token is the last token of its document, so what follows it is not predictable.
    """
    inputs, labels = window[:, :-1], window[:, 1:]
    if logits.shape[:2] != inputs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match inputs {tuple(inputs.shape)}")
    labels = labels.masked_fill(inputs == eod, _IGNORE)
    if bool((labels == _IGNORE).all()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=_IGNORE)
