"""Run settings of `nestc train` from a TOML file, `--set` and flags, and back to TOML (`--print-config`).

A config file has three tables, all optional:

    [train]   steps, batch, seq_len, seed, tokenizer, log_every, ckpt_every, keep_checkpoints, holdout, ...
    [optim]   lr, weight_decay, warmup, schedule, grad_clip
    [spec]    the spec's parameters (d = 128, chunks = [16, 64], mem_read = "before")

Precedence, lowest first: the defaults (TrainSettings and the spec's own parameter values) < the config
file < `--set` (dotted names for run settings, bare names for spec parameters) < explicit flags (`--steps`,
`--batch`, `--seq-len`, `--tokenizer`). The file is data: it is parsed by tomllib and validated by the
pydantic `TrainSettings`, never executed; an unknown or misplaced key is an error at its line and column.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nestc_runtime import RuntimeInputError
from nestc_runtime.training import TrainSettings

from .diagnostics import Source
from .ir.elaborate import ParamValue, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

OPTIM_FIELDS = ("lr", "weight_decay", "warmup", "schedule", "grad_clip")
"""Run settings that live in the [optim] table (and `--set optim.*`); every other one lives in [train]."""

SPEC_TABLE = "spec"
MAX_CONFIG_BYTES = 1 << 20
_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


def section_of(name: str) -> str:
    """The table a run setting belongs to."""
    return "optim" if name in OPTIM_FIELDS else "train"


class ConfigError(RuntimeInputError):
    """A bad config file: the message is located at file:line:col and `snippet` shows the line with a caret."""

    def __init__(self, message: str, source: Source, line: int | None, col: int = 1, hint: str | None = None):
        where = f"{source.path}:{line}:{col}" if line else source.path
        super().__init__(message, path=where, hint=hint)
        self.snippet = _snippet(source, line, col) if line else ""


def _snippet(source: Source, line: int, col: int) -> str:
    text = source.line_text(line) if line <= source.text.count("\n") + 1 else ""
    gutter = " " * len(str(line))
    return f" {gutter} |\n {line} | {text}\n {gutter} | {' ' * (col - 1)}^"


@dataclass
class RunConfig:
    """What a config file sets: run settings (flat TrainSettings names) and spec parameters."""

    settings: dict[str, Any] = field(default_factory=dict)
    params: dict[str, ParamValue] = field(default_factory=dict)
    source: Source | None = None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a config file (see the module docstring); raises ConfigError."""
    source = _read(Path(path))
    try:
        data = tomllib.loads(source.text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        found = _AT.search(message)
        line, col = (int(found.group(1)), int(found.group(2))) if found else (None, 1)
        raise ConfigError(f"not valid TOML: {_AT.sub('', message).strip()}", source, line, col) from None
    config = RunConfig(source=source)
    for table, values in data.items():
        if table not in ("train", "optim", SPEC_TABLE) or not isinstance(values, dict):
            line, col = _locate(source, None, table)
            raise ConfigError(
                f"unknown table or key `{table}`",
                source,
                line,
                col,
                hint="a config file has the tables [train], [optim] and [spec]",
            )
        if table == SPEC_TABLE:
            config.params.update(_spec_params(values, source))
        else:
            config.settings.update(_settings(table, values, source))
    validate_settings(config.settings, source)
    return config


def _read(path: Path) -> Source:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise RuntimeInputError(f"a config file larger than {MAX_CONFIG_BYTES} bytes is refused", path=str(path))
    try:
        return Source(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise RuntimeInputError(f"the config file is not UTF-8 text (byte {error.start})", path=str(path)) from None


def _settings(table: str, values: dict[str, Any], source: Source) -> dict[str, Any]:
    fields = TrainSettings.model_fields
    for name in values:
        if name in fields and section_of(name) == table:
            continue
        line, col = _locate(source, table, name)
        if name in fields:
            hint = f"`{name}` belongs in [{section_of(name)}]"
        else:
            names = [f for f in fields if section_of(f) == table]
            hint = suggest(name, names) or f"[{table}] takes {', '.join(names)}"
        raise ConfigError(f"unknown run setting `{table}.{name}`", source, line, col, hint=hint)
    return dict(values)


def _spec_params(values: dict[str, Any], source: Source) -> dict[str, ParamValue]:
    params: dict[str, ParamValue] = {}
    for name, value in values.items():
        converted = _param(value)
        if converted is None:
            line, col = _locate(source, SPEC_TABLE, name)
            raise ConfigError(
                f"spec parameter `{name}` must be a number, a word or a list of numbers",
                source,
                line,
                col,
                hint='for example d = 128, mem_read = "before", chunks = [16, 64]',
            )
        params[name] = converted
    return params


def _param(value: Any) -> ParamValue | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value if value.isidentifier() else None
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def validate_settings(values: Mapping[str, Any], source: Source | None = None) -> TrainSettings:
    """TrainSettings from flat values; a validation error points at the offending key of the file."""
    from pydantic import ValidationError

    try:
        return TrainSettings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        message = f"run setting `{section_of(name)}.{name}`: {first['msg']}"
        if source is None:
            raise RuntimeInputError(message) from None
        line, col = _locate(source, section_of(name), name)
        raise ConfigError(message, source, line, col) from None


def check_spec_params(config: RunConfig, declared: list[str]) -> None:
    """Every [spec] key must name a parameter of the spec (`declared`)."""
    assert config.source is not None
    for name in config.params:
        if name not in declared:
            line, col = _locate(config.source, SPEC_TABLE, name)
            hint = suggest(name, declared) or f"the spec's parameters: {', '.join(declared) or 'none'}"
            raise ConfigError(f"[spec] `{name}` names no parameter of the spec", config.source, line, col, hint=hint)


def _locate(source: Source, table: str | None, key: str) -> tuple[int | None, int]:
    """Line and column of `key` in `[table]` (None: the top level) of a simple TOML file, if it can be found."""
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"' -]+?)\s*\]")
    for number, text in enumerate(source.text.splitlines(), start=1):
        found = header.match(text)
        if found:
            name = found.group(1).strip("\"' ")
            if table is None and name == key:
                return number, text.index("[") + 1
            current = name
            continue
        match = re.match(rf"^(\s*)(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*[=.]", text)
        if match and current == table:
            return number, len(match.group(1)) + 1
    return None, 1


# ---- merging and printing --------------------------------------------------------------------------------


def merge_settings(
    config: Mapping[str, Any], sets: Mapping[str, str], flags: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The flat run-setting values by precedence: config file < `--set section.name=v` < flags (not None).

    Returns (values, origin): origin names where each value came from, for error messages."""
    fields = TrainSettings.model_fields
    values: dict[str, Any] = dict(config)
    origin = {name: "config" for name in config}
    for dotted, value in sets.items():
        section, _, name = dotted.partition(".")
        if name not in fields or section != section_of(name):
            if name in fields:
                hint = f"use --set {section_of(name)}.{name}={value}"
            else:
                hint = suggest(name, fields) or f"run settings: {', '.join(fields)}"
            raise UsageProblemText(f"--set {dotted}: no such run setting ({hint})")
        values[name] = value
        origin[name] = f"--set {dotted}"
    for name, value in flags.items():
        if value is not None:
            values[name] = value
            origin[name] = "--" + name.replace("_", "-")
    return values, origin


class UsageProblemText(ValueError):
    """A bad `--set` of a run setting; the CLI turns it into a usage error (exit 2)."""


def to_toml(settings: TrainSettings, params: Mapping[str, ParamValue], spec: str) -> str:
    """The resolved run as a config file that `--config` reads back to the same settings and parameters."""
    lines = [
        f"# nestc train {spec} --config THIS_FILE (--data PATH | --task NAME) --out DIR",
        "# Precedence: defaults < this file < --set < --steps/--batch/--seq-len/--tokenizer.",
    ]
    values = settings.model_dump()
    for table in ("train", "optim"):
        lines += ["", f"[{table}]"]
        for name, info in TrainSettings.model_fields.items():
            if section_of(name) != table:
                continue
            value = values[name]
            comment = f"  # {info.description}" if info.description else ""
            if value is None:
                lines.append(f"# {name} = (unset: each optimizer level keeps the spec's own)")
            else:
                lines.append(f"{name} = {_toml_value(value)}{comment}")
    lines += ["", f"[{SPEC_TABLE}]"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in params.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
