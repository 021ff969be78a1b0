"""Transformer vs Titans vs HOPE at equal parameter count, equal training tokens and several seeds.

Run outside CI (it is long). Each (model, seed) pair trains twice with `nestc train`: on text (the Python
standard library's sources, the held-out tail kept apart) for the `ppl` and `memorize` evaluations, and on
`--task mqar` for `mqar`. Every finished evaluation writes `bench/results/compare/<model>-s<seed>-<task>.json`;
a rerun skips those and resumes an interrupted training run from its newest checkpoint, so the script can be
stopped and started again at will. `--report` (also done after every run) turns the result files into
`bench/results/compare.md` (mean ± std over seeds) and `bench/results/compare.png`.

    python bench/compare.py --measure                          # tokens/s of each model, seconds per 1M tokens
    nice -n 10 python bench/compare.py --models transformer,titans --cpu-minutes 60
    python bench/compare.py --report

Titans is `specs/titans_lmm.nest` (the neural memory alone, no attention): HOPE has no attention either, so
the Titans-vs-HOPE comparison isolates the memory, and the Transformer is the attention baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "compare"
TASKS = ("mqar", "memorize", "ppl")
HOLDOUT_BYTES = 64 * 1024
TEXT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Model:
    """A shipped spec at the sizes that bring it to the common parameter count."""

    name: str
    spec: str
    sets: tuple[str, ...]


# About 1.25M parameters each (HOPE at its spec's own sizes); `--check-sizes` prints the exact counts.
MODELS = {
    "transformer": Model("transformer", "specs/transformer.nest", ("d=160", "layers=4")),
    "titans": Model("titans", "specs/titans_lmm.nest", ("d=160", "layers=3")),
    "hope": Model("hope", "specs/hope.nest", ("d=128", "layers=2")),
}


@dataclass(frozen=True)
class Regime:
    """One kind of training run: its data flag, sequence shape and the evaluations it serves."""

    name: str
    batch: int
    seq_len: int
    evals: tuple[str, ...]


REGIMES = {
    "text": Regime("text", batch=8, seq_len=256, evals=("ppl", "memorize")),
    "mqar": Regime("mqar", batch=16, seq_len=128, evals=("mqar",)),
}


# ---- data ------------------------------------------------------------------------------------------------


def stdlib_corpus(work: Path) -> tuple[Path, Path]:
    """The standard library's .py sources (sorted, top level and packages) as one training file and a held-out
    tail file; written once into `work`."""
    train, held = work / "stdlib_train.txt", work / "stdlib_heldout.txt"
    if train.exists() and held.exists():
        return train, held
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib", "lib2to3") for part in path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        pieces.append(text)
        total += len(text.encode())
        if total > TEXT_MAX_BYTES:
            break
    data = "\n".join(pieces).encode()
    work.mkdir(parents=True, exist_ok=True)
    train.write_bytes(data[:-HOLDOUT_BYTES])
    held.write_bytes(data[-HOLDOUT_BYTES:].decode("utf-8", errors="ignore").encode())
    return train, held


# ---- runs ------------------------------------------------------------------------------------------------


def nestc(*args: str, threads: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "nestc", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def result_path(model: str, seed: int, task: str, tokens: int) -> Path:
    return RUNS / f"{model}-{tokens}tok-s{seed}-{task}.json"


def run_pair(model: Model, regime: Regime, seed: int, args: argparse.Namespace, corpus: tuple[Path, Path]) -> bool:
    """Train (or resume) one (model, regime, seed) run and evaluate it; False when stopped by the budget."""
    missing = [task for task in regime.evals if not result_path(model.name, seed, task, args.tokens).exists()]
    if not missing:
        return True
    steps = max(1, round(args.tokens / (regime.batch * regime.seq_len)))
    folder = args.work / f"{model.name}-{args.tokens}tok-s{seed}-{regime.name}"
    sets = [f"--set={item}" for item in model.sets]
    done_ckpt = folder / f"ckpt-{steps:08d}"
    train_seconds = None
    if not done_ckpt.exists():
        data = ["--task", "mqar"] if regime.name == "mqar" else ["--data", str(corpus[0])]
        command = [
            "train", model.spec, *data, "--steps", str(steps), "--out", str(folder), *sets,
            "--batch", str(regime.batch), "--seq-len", str(regime.seq_len), f"--set=train.seed={seed}",
            f"--set=train.ckpt_every={max(1, steps // 10)}", "--set=train.keep_checkpoints=1",
            f"--set=optim.warmup={min(100, steps // 10)}", "--no-progress", "--format", "json",
        ]  # fmt: skip
        if args.lr is not None:
            command.append(f"--set=optim.lr={args.lr}")
        if any(folder.glob("ckpt-*")):
            command.append("--resume")
        started = time.perf_counter()
        if not run_within_budget(command, args):
            return False
        train_seconds = time.perf_counter() - started
    for task in missing:
        command = ["eval", model.spec, "--ckpt", str(folder), "--task", task, "--seed", "0", *sets, "--format", "json"]
        if task == "ppl":  # scored at the training length, where a Transformer's positions are in distribution
            command += ["--data", str(corpus[1]), "--context", str(regime.seq_len)]
        done = nestc(*command, threads=args.threads)
        if done.returncode != 0:
            raise SystemExit(f"eval failed: {' '.join(command)}\n{done.stderr}")
        result = json.loads(done.stdout)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        record = {
            "model": model.name, "spec": model.spec, "sets": list(model.sets), "seed": seed, "task": task,
            "regime": regime.name, "batch": regime.batch, "seq_len": regime.seq_len, "steps": steps,
            "train_tokens": steps * regime.batch * regime.seq_len, "parameters": count_parameters(model),
            "final_train_loss": metrics[-1]["loss"] if metrics else None, "lr": args.lr,
            "train_seconds_last_invocation": train_seconds, "score": result["score"], "rows": result["rows"],
        }  # fmt: skip
        RUNS.mkdir(parents=True, exist_ok=True)
        target = result_path(model.name, seed, task, args.tokens)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(target)
        print(f"{model.name} seed {seed} {task}: {result['score']}", flush=True)
    return True


def run_within_budget(command: list[str], args: argparse.Namespace) -> bool:
    """Run `nestc train`; kill it (its checkpoints stay, a rerun resumes) once the CPU budget is spent. The
    budget counts every finished child (training and evaluation) plus the running one."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    process = subprocess.Popen([sys.executable, "-m", "nestc", *command], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    budget = args.cpu_minutes * 60 if args.cpu_minutes else math.inf
    while process.poll() is None:
        time.sleep(2)
        if children_cpu_seconds() + (process_cpu_seconds(process.pid) or 0.0) > budget:
            process.terminate()
            process.wait()
            print(f"CPU budget of {args.cpu_minutes} min spent; stopped {' '.join(command[:2])}", flush=True)
            return False
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"train failed ({process.returncode}): {' '.join(command)}\n{err}")
    print(f"trained: {out.strip()} [{children_cpu_seconds() / 60:.1f} CPU min so far]", flush=True)
    return True


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process of this script."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_counts: dict[str, int] = {}


def count_parameters(model: Model) -> int:
    """The exact trainable parameter count of the model as compiled at its sizes."""
    if model.name not in _counts:
        from nestc.pipeline import front_end, to_plan
        from nestc_runtime import CompiledModel

        params = {k: float(v) for k, v in (item.split("=") for item in model.sets)}
        built = CompiledModel(to_plan(front_end(str(ROOT / model.spec), params, None)), backend="reference")
        _counts[model.name] = sum(p.numel() for p in built.parameters())
    return _counts[model.name]


def measure(models: list[Model], args: argparse.Namespace, corpus: tuple[Path, Path]) -> None:
    """Train each model for a few steps of each regime; print tokens/s and the time per 1M tokens."""
    import tempfile

    for regime in REGIMES.values():
        for model in models:
            steps = args.measure_steps
            with tempfile.TemporaryDirectory() as folder:
                data = ["--task", "mqar"] if regime.name == "mqar" else ["--data", str(corpus[0])]
                sets = [f"--set={item}" for item in model.sets]
                started = time.perf_counter()
                done = nestc("train", model.spec, *data, "--steps", str(steps), "--out", folder, *sets, "--batch",
                             str(regime.batch), "--seq-len", str(regime.seq_len), "--no-progress", "--format", "json",
                             threads=args.threads)  # fmt: skip
                wall = time.perf_counter() - started
            if done.returncode != 0:
                print(f"{model.name} {regime.name}: failed: {done.stderr.strip()[-300:]}")
                continue
            rate = json.loads(done.stdout)["tokens_per_s"]
            print(
                f"{model.name:12s} {regime.name:5s} {count_parameters(model):>10,} params  {rate:9,.0f} tok/s  "
                f"{1e6 / max(rate, 1e-9) / 60:8.1f} min per 1M tokens  ({steps} steps, {wall:.0f} s wall, "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


# ---- report ----------------------------------------------------------------------------------------------

HEADLINES = {
    "mqar": ("accuracy", "MQAR accuracy (2/4/8 pairs) ↑"),
    "memorize": ("drop", "memorize: first − second pass loss (nats) ↑"),
    "ppl": ("bits_per_byte", "held-out bits per byte ↓"),
}


def collect() -> dict[tuple[str, int], dict[str, list[dict]]]:
    """Result records by (model, training tokens per run), then by task."""
    found: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for path in sorted(RUNS.glob("*.json")):
        record = json.loads(path.read_text())
        found.setdefault((record["model"], record["train_tokens"]), {}).setdefault(record["task"], []).append(record)
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def cell(records: list[dict] | None, task: str) -> str:
    if not records:
        return "–"
    mean, std = mean_std([float(r["score"][HEADLINES[task][0]]) for r in records])
    return f"{mean:.3f} ± {std:.3f} (n={len(records)})"


def report() -> None:
    found = collect()
    if not found:
        print("no results yet")
        return
    order = {name: i for i, name in enumerate(MODELS)}
    records = [r for tasks in found.values() for runs in tasks.values() for r in runs]
    rates = ", ".join(sorted({str(r.get("lr") or "the spec's") for r in records}))
    keys = sorted(found, key=lambda key: (key[1], order.get(key[0], 99)))
    lines = [
        "# Transformer vs Titans (LMM) vs HOPE",
        "",
        "Written by `bench/compare.py --report` from `bench/results/compare/*.json`: mean ± sample std over the",
        "seeds that finished (n). Text runs (ppl, memorize) train on the Python standard library's sources, the",
        "held-out tail kept apart (its first 4,096 bytes scored in pieces of the training length, 256, each from a",
        "fresh state: `nestc eval --context`); mqar runs train on `--task mqar` (rows with aligned documents).",
        "Tokens are per training run.",
        f"Shapes: text batch {REGIMES['text'].batch} x {REGIMES['text'].seq_len}, mqar batch {REGIMES['mqar'].batch} x "
        f"{REGIMES['mqar'].seq_len}; warm-up 10% of the steps (at most 100), then cosine; learning rate "
        f"{rates}.",
        "Chance: MQAR answers are one of 26 letters (0.038); a model that does not recall in context sits there.",
        "",
        "| model | params | tokens/run | " + " | ".join(HEADLINES[t][1] for t in TASKS) + " |",
        "|---|---|---|" + "---|" * len(TASKS),
    ]
    for key in keys:
        tasks = found[key]
        params = next(iter(tasks.values()))[0]["parameters"]
        row = " | ".join(cell(tasks.get(t), t) for t in TASKS)
        lines.append(f"| {key[0]} | {params:,} | {key[1]:,} | {row} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".compare.md.{os.getpid()}"  # several workers may report at once: replace atomically
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(RESULTS / "compare.md")
    plot(found, sorted({key[1] for key in keys}))
    print("\n".join(lines), flush=True)


def plot(found: dict[tuple[str, int], dict[str, list[dict]]], budgets: list[int]) -> None:
    """Bars (mean, std error bars) per task, one row per training budget (tokens per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(budgets), len(TASKS), figsize=(4 * len(TASKS), 3.4 * len(budgets)), squeeze=False)
    colors = {"transformer": "#4c72b0", "titans": "#dd8452", "hope": "#55a868"}
    for axes, tokens in zip(grid, budgets):
        for axis, task in zip(axes, TASKS):
            key, title = HEADLINES[task]
            names, means, stds, shades = [], [], [], []
            for model in MODELS:
                records = found.get((model, tokens), {}).get(task)
                if records:
                    mean, std = mean_std([float(r["score"][key]) for r in records])
                    names.append(f"{model}\n(n={len(records)})")
                    means.append(mean)
                    stds.append(std)
                    shades.append(colors[model])
            axis.bar(names, means, yerr=stds, capsize=4, color=shades)
            if task == "mqar":
                axis.axhline(1 / 26, color="grey", linestyle="--", linewidth=1, label="chance (1/26)")
                axis.legend(fontsize=7)
            axis.set_title(f"{title} · {tokens:,} tokens", fontsize=9)
    fig.tight_layout()
    tmp = RESULTS / f".compare.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    tmp.replace(RESULTS / "compare.png")
    plt.close(fig)


# ---- entry point -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="transformer,titans,hope", help="comma-separated, of: " + ",".join(MODELS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens of every run")
    parser.add_argument("--regimes", default="text,mqar", help="text (ppl, memorize) and/or mqar")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every model (else the spec's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each nestc process")
    parser.add_argument("--cpu-minutes", type=float, default=0.0, help="stop after this much training CPU; 0: none")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare", help="run folders (checkpoints)")
    parser.add_argument("--measure", action="store_true", help="only measure tokens/s of each model")
    parser.add_argument("--measure-steps", type=int, default=3)
    parser.add_argument("--check-sizes", action="store_true", help="print the parameter counts and exit")
    parser.add_argument("--report", action="store_true", help="only write compare.md / compare.png")
    args = parser.parse_args()
    models = [MODELS[name] for name in args.models.split(",")]
    if args.check_sizes:
        counts = {m.name: count_parameters(m) for m in models}
        for name, count in counts.items():
            print(f"{name:12s} {count:>10,}  ({count / max(counts.values()) - 1:+.1%} vs the largest)")
        return
    if args.report:
        report()
        return
    corpus = stdlib_corpus(args.work)
    if args.measure:
        measure(models, args, corpus)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # seed-major: a budget cut leaves every model with the same seeds done
        for regime in (REGIMES[name] for name in args.regimes.split(",")):
            for model in models:
                if not run_pair(model, regime, seed, args, corpus):
                    report()
                    return
                report()


if __name__ == "__main__":
    main()
