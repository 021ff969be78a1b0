"""Training metrics: a JSON-lines log, its truncation for resumed runs and an optional PNG loss curve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class MetricsWriter:
    """Appends one JSON object per line to a file and flushes after every line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open until close())

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one line."""
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file (further writes fail)."""
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSONL metrics file; a missing file gives [] and malformed lines are skipped."""
    file = Path(path)
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a line cut short by a crash
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike[str], step: int) -> None:
    """Drop the records after `step` (and malformed lines), so a resumed run does not log a step twice."""
    file = Path(path)
    if not file.is_file():
        return
    kept = [record for record in read_metrics(file) if int(record.get("step", 0)) <= step]
    staging = file.with_name(file.name + ".tmp")
    staging.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    os.replace(staging, file)


def loss_curve_png(jsonl_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> bool:
    """Plot loss against step from a metrics file into a PNG; False when matplotlib is missing or no data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(r["step"], r["loss"]) for r in read_metrics(jsonl_path) if "step" in r and "loss" in r]
    if not points:
        return False
    steps, losses = zip(*points)
    figure, axes = plt.subplots(figsize=(7, 4))
    try:
        axes.plot(steps, losses, linewidth=1.5)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss (nats/token)")
        axes.set_title("loss curve")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(png_path, dpi=120)
    finally:
        plt.close(figure)
    return True
