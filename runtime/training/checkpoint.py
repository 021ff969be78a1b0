"""Atomic checkpoints: tensors in `model.safetensors`, everything else in `meta.json`; nothing is pickled.

A checkpoint is written into a temporary sibling directory, flushed to disk and then renamed into place, so a
crash while saving leaves the previous checkpoint complete and loadable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import RuntimeInputError

TENSORS_FILE = "model.safetensors"
META_FILE = "meta.json"
_CKPT_NAME = re.compile(r"^ckpt-(\d{8,})$")
_TEMP_MARK = ".tmp-"


class CheckpointMissing(RuntimeInputError):
    """The checkpoint directory, or one of its files, does not exist (the command line exits with 2)."""


def save_checkpoint(directory: str | os.PathLike[str], *, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` and `meta` to `directory` atomically and return its path.

    Tensors are copied to contiguous CPU tensors of their own first, so views and shared storage are fine.
    An existing checkpoint at `directory` is replaced.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}", dir=target.parent))
    try:
        _write_tensors(staging / TENSORS_FILE, tensors)
        _write_meta(staging / META_FILE, meta)
        _fsync_path(staging)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_path(target.parent)
    return target


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    copies = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(tensor).__name__}, not a tensor")
        copies[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    save_file(copies, str(path))
    _fsync_path(path)


def _write_meta(path: Path, meta: dict) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first and removed afterwards."""
    if not target.exists():
        os.replace(staging, target)
        return
    aside = target.with_name(f".{target.name}{_TEMP_MARK}old-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by `save_checkpoint`: (tensors, meta).

    Raises `CheckpointMissing` when the directory or one of its files does not exist and `RuntimeInputError`
    when a file is truncated or corrupt.
    """
    target = Path(directory)
    if not target.is_dir():
        raise CheckpointMissing(
            "checkpoint not found", path=str(target), hint="give the directory that holds model.safetensors"
        )
    for name in (TENSORS_FILE, META_FILE):
        if not (target / name).is_file():
            raise CheckpointMissing(
                f"the checkpoint has no {name}",
                path=str(target),
                hint="the checkpoint is incomplete; use another one (see ckpt-* in the run folder)",
            )
    meta = _read_meta(target / META_FILE)
    tensors = _read_tensors(target / TENSORS_FILE)
    return tensors, meta


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RuntimeInputError(
            f"the checkpoint metadata is unreadable or corrupt ({error})",
            path=str(path),
            hint="the checkpoint is damaged; use an earlier one",
        ) from None
    if not isinstance(meta, dict):
        raise RuntimeInputError(
            "the checkpoint metadata is not a JSON object", path=str(path), hint="use an earlier checkpoint"
        )
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise RuntimeInputError(
            f"the checkpoint weights are unreadable or corrupt ({error})",
            path=str(path),
            hint="the checkpoint is damaged (perhaps truncated); use an earlier one",
        ) from None


def check_compatible(meta: dict, expected: dict, *, path: str | None = None) -> None:
    """Raise `RuntimeInputError` naming the first entry of `expected` whose value differs in `meta`; nested
    dicts (the spec's parameters) are compared entry by entry, so the error names `params.chunks`, not the
    whole dict."""
    difference = _first_difference(meta, expected)
    if difference is None:
        return
    key, there, here = difference
    if there is _ABSENT:
        raise RuntimeInputError(
            f"the checkpoint does not record {key!r} (expected {here!r})",
            path=path,
            hint="the checkpoint was written by another program or version",
        )
    shown_here = "absent" if here is _ABSENT else repr(here)
    raise RuntimeInputError(
        f"the checkpoint does not match: {key} is {there!r} there but {shown_here} here",
        path=path,
        hint=f"use the same {key} as the run that wrote the checkpoint",
    )


_ABSENT = object()


def _first_difference(meta: dict, expected: dict, prefix: str = "") -> tuple[str, object, object] | None:
    for key, value in expected.items():
        there = meta.get(key, _ABSENT)
        if isinstance(there, dict) and isinstance(value, dict):
            inner = _first_difference(there, value, f"{prefix}{key}.")
            if inner is None and set(there) - set(value):
                extra = sorted(set(there) - set(value))[0]
                inner = (f"{prefix}{key}.{extra}", there[extra], _ABSENT)
            if inner is not None:
                return inner
        elif there is _ABSENT or there != value:
            return f"{prefix}{key}", there, value
    return None


class CheckpointManager:
    """Numbered checkpoints `ckpt-<step:08d>` in `out_dir`, keeping the newest `keep` of them."""

    def __init__(self, out_dir: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise RuntimeInputError(f"keep must be at least 1, got {keep}", hint="for example keep_checkpoints=3")
        self.out_dir = Path(out_dir)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of `step` lives."""
        return self.out_dir / f"ckpt-{step:08d}"

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Save the checkpoint of `step`, then remove the oldest ones beyond `keep` and stale temporaries."""
        path = save_checkpoint(self.path_for(step), tensors=tensors, meta=meta)
        self._prune()
        return path

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.out_dir.is_dir():
            return []
        found = []
        for entry in self.out_dir.iterdir():
            match = _CKPT_NAME.match(entry.name)
            if match and (entry / TENSORS_FILE).is_file() and (entry / META_FILE).is_file():
                found.append((int(match.group(1)), entry))
        return [entry for _, entry in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for entry in self.out_dir.iterdir():
            if entry.name.startswith(".ckpt-") and _TEMP_MARK in entry.name and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
