"""Evaluate one trained checkpoint under changed spec parameters: which part of a model does the work?

    python bench/ablate.py specs/hope.nest --ckpt runs/compare/hope-2000000tok-s1-mqar --task mqar \
        --set d=128 --set layers=2 --change cms_lr=0 --change eta_max=0 --change "chunks=[8,64,256]"

Every `--change` is one evaluation of the same weights with that parameter changed (the first row is the
checkpoint as trained). A parameter that sets an in-context learning rate, a chunk size or a read mode changes
what the levels do at test time without changing any weight's shape, so the weights load; `nestc eval`
refuses exactly this (a checkpoint is one model), which is why this lives here, as a diagnostic. The model was
never trained under the change, so read a row as "what this part contributes", not as a better setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nestc.cli import UsageProblem, parse_sets  # noqa: E402
from nestc.pipeline import SpecError, SpecFileError, front_end, to_plan  # noqa: E402
from nestc_runtime import CompiledModel, RuntimeInputError  # noqa: E402
from nestc_runtime.evaluation import evaluate, get_task, model_predictor, resolve_checkpoint  # noqa: E402
from nestc_runtime.training.checkpoint import load_checkpoint  # noqa: E402
from nestc_runtime.training.loop import restore_model  # noqa: E402


def score(spec: str, params: dict, weights: dict, ckpt: Path, task: str, examples: int | None) -> dict:
    model = CompiledModel(to_plan(front_end(spec, params, None)))
    restore_model(model, weights, str(ckpt))  # checks every weight's name and shape
    model.eval()
    chosen = get_task(task) if examples is None else get_task(task, per_group=examples)
    return evaluate(model_predictor(model), chosen, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--ckpt", required=True, type=Path, help="a ckpt-* folder or a run folder")
    parser.add_argument("--task", default="mqar", choices=["mqar", "niah", "continual", "memorize"])
    parser.add_argument("--set", action="append", default=[], help="the parameters the run was trained with")
    parser.add_argument("--change", action="append", default=[], help="one evaluation per change: NAME=VALUE")
    parser.add_argument("--examples", type=int, default=None, help="per row of the table, as in `nestc eval`")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.examples is not None and args.examples < 1:
        parser.error("--examples must be at least 1")
    torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.ckpt)
    weights, _ = load_checkpoint(ckpt)  # once: every change evaluates the same weights
    settings = parse_sets([*args.set, *args.change])[1]  # nestc's --set syntax: numbers, words, [16,64]
    if settings:
        parser.error(f"only spec parameters can change here, not {', '.join(settings)}")
    trained = parse_sets(args.set)[0]
    for change in ["", *args.change]:
        params = {**trained, **parse_sets([change])[0]} if change else trained
        result = score(args.spec, params, weights, ckpt, args.task, args.examples)
        groups = "  ".join(f"{_label(row)}: {row['accuracy']:.3f}" for row in result["rows"] if "accuracy" in row)
        headline = ", ".join(f"{key} {value:.3f}" for key, value in result["score"].items())
        print(f"{change or '(as trained)':<24} {headline:<20} {groups}", flush=True)


def _label(row: dict) -> str:
    return ",".join(str(row[key]) for key in row if key not in ("examples", "tokens", "accuracy", "loss"))


if __name__ == "__main__":
    try:
        main()
    except SpecError as error:  # a wrong --set: the compiler's own one-line diagnostic
        raise SystemExit(str(error).splitlines()[0]) from None
    except (RuntimeInputError, SpecFileError, UsageProblem) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
