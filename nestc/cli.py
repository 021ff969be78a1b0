"""The `nestc` command line.

Exit codes (DESIGN §8): 0 success; 1 an error in the user's input (spec, data, checkpoint), printed as a
diagnostic; 2 a usage error (bad flag, missing file); 70 an internal error (a bug), one line, with the
traceback only under NESTC_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from nestc_runtime import CompiledModel, RuntimeInputError

from . import codes
from .diagnostics import CompileError, Diagnostic, SourceMap, render, to_json
from .ir.elaborate import ParamValue, suggest
from .pipeline import Compilation, SpecError, SpecFileError, front_end, to_plan
from .resources import require_fits

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 70
FORMATS = click.Choice(["text", "json"])
BACKENDS = ["auto", "chunked", "reference", "triton"]  # triton: generated kernels (auto picks them on a GPU)
TRAIN_TASKS = ["mqar", "niah", "continual", "memorize"]
EVAL_TASKS = ["mqar", "niah", "ppl", "continual", "memorize"]
EVAL_TOKENS = 1024  # the longest sequence an evaluation task scores at once, for the memory estimate
FORCE = click.option("--force", is_flag=True, help="Run even when the memory estimate exceeds what is available.")


class UsageProblem(click.UsageError):
    """A usage error found after click parsed the flags (a bad --set, say): exit 2."""


# ---- helpers ---------------------------------------------------------------------------------------------


def parse_sets(items: Sequence[str]) -> tuple[dict[str, ParamValue], dict[str, str]]:
    """`--set NAME=V`: bare names set spec parameters (a number, a word, or a list `[16,64]`), dotted names
    set run settings."""
    params: dict[str, ParamValue] = {}
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageProblem(f"--set expects NAME=VALUE, got {item!r}")
        if "." in name:
            settings[name] = value
        else:
            params[name] = _param_value(name, value)
    return params, settings


def _param_value(name: str, value: str) -> ParamValue:
    try:
        return float(value)
    except ValueError:
        pass
    if value.startswith("[") and value.endswith("]"):
        try:
            return [float(v) for v in value[1:-1].split(",") if v.strip()]
        except ValueError:
            raise UsageProblem(f"--set {name}={value}: a list holds numbers, e.g. [16,64,256]") from None
    if value.isidentifier():
        return value
    raise UsageProblem(f"--set {name}={value}: a spec parameter takes a number, a word or a list of numbers")


def _print_diagnostics(diags: list[Diagnostic], sources: SourceMap, fmt: str) -> None:
    """Diagnostics to stderr: colours through rich on a terminal, plain text otherwise; JSON on request."""
    if fmt == "json":
        click.echo(to_json(diags, sources))
        return
    console = _console()
    for diag in diags:
        text = render(diag, sources)
        first, _, rest = text.partition("\n")
        if console is None:
            click.echo(text, err=True)
            continue
        from rich.text import Text

        color = "bold red" if diag.severity == "error" else "bold yellow"
        console.print(Text(first, style=color) + Text("\n" + rest if rest else ""))


def _console() -> Any:
    """A rich console on stderr when it is a terminal; None for the plain fallback (pipes, CI, no rich)."""
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _compile(
    spec: str,
    sets: Sequence[str],
    fmt: str,
    seq_len: int | None = None,
    base_params: dict[str, ParamValue] | None = None,
    run_settings: bool = False,
) -> tuple[Compilation, dict[str, str]]:
    """Compile SPEC with its parameters from `base_params` (a config file, a tokenizer's vocab), then --set.
    Dotted `--set` names are run settings, which only `train` (`run_settings`) takes."""
    from .codegen import install

    install()  # a model built from this compilation asks the compiler for its Triton kernels
    params, settings = parse_sets(sets)
    if settings and not run_settings:
        name = next(iter(settings))
        raise UsageProblem(f"--set {name}=...: run settings (train.*, optim.*) apply to `nestc train` only")
    compilation = front_end(spec, {**(base_params or {}), **params}, seq_len)
    if compilation.warnings and fmt == "text":
        _print_diagnostics(compilation.warnings, compilation.sources, fmt)
    return compilation, settings


def _describe(compilation: Compilation) -> str:
    system = compilation.system
    levels = ", ".join(f"{lv.name} {lv.update.describe()}" for lv in system.levels)
    return f"{compilation.path}: ok: system `{system.name}`, {len(system.levels)} levels ({levels})"


# ---- commands --------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nestc")
def cli() -> None:
    """nestc: compile, check and train nested-learning systems written in .nest."""


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Override a spec parameter.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Training length, for the chunk warning.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def check(spec: str, sets: tuple[str, ...], seq_len: int | None, fmt: str) -> None:
    """Parse and check SPEC; print every error and warning."""
    compilation, _ = _compile(spec, sets, fmt, seq_len)
    if fmt == "json":
        click.echo(to_json(compilation.warnings, compilation.sources))
    else:
        click.echo(_describe(compilation))


@cli.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--check", "check_only", is_flag=True, help="Exit 1 if a file is not canonical; change nothing.")
@click.option("--stdout", is_flag=True, help="Print the canonical text instead of rewriting the file.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def fmt(specs: tuple[str, ...], check_only: bool, stdout: bool, fmt: str) -> int:
    """Rewrite SPECS in canonical form (comments kept)."""
    from .language.format import format_source
    from .language.parser import parse
    from .pipeline import SpecError, read_source

    changed = []
    for spec in specs:
        source = read_source(spec)
        try:
            canonical = format_source(source, parse(source))
        except CompileError as exc:
            sources = SourceMap()
            sources.add(source)
            raise SpecError(exc.diagnostics, sources) from None
        if stdout:
            click.echo(canonical, nl=False)
        elif canonical != source.text:
            changed.append(spec)
            if not check_only:
                _write_atomic(Path(spec), canonical)
    if fmt == "json":
        click.echo(json.dumps({"not_canonical" if check_only else "rewritten": changed}))
    else:
        for spec in changed:
            click.echo(f"{spec}: {'not canonical' if check_only else 'formatted'}", err=True)
    return EXIT_INPUT if check_only and changed else EXIT_OK


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Override a spec parameter.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def show(spec: str, sets: tuple[str, ...], fmt: str) -> None:
    """A table of SPEC's level instances: memory, objective, optimizer, frequency, reads, owner, parameters."""
    from .show import level_table, render_table

    compilation, _ = _compile(spec, sets, fmt)
    rows = level_table(compilation.system)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(render_table(compilation.system, rows))


@cli.command(name="compile")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Override a spec parameter.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def compile_cmd(spec: str, out: str, sets: tuple[str, ...], fmt: str) -> None:
    """Compile SPEC into DIR: plan.json (what the runtime runs), ir.json, schedule.txt, the spec, and the
    generated Triton kernels of its levels with their line maps (kernels/)."""
    compilation, _ = _compile(spec, sets, "text")
    plan = to_plan(compilation)
    directory = Path(out)
    plan.save(directory)
    _write_atomic(directory / "ir.json", compilation.system.model_dump_json(indent=2))
    _write_atomic(directory / "schedule.txt", _schedule_text(plan))
    _write_atomic(directory / "spec.nest", compilation.source.text)
    from .codegen import write_level_kernels

    kernels = write_level_kernels(plan, compilation.system, compilation.source, directory)  # Triton, per level
    files = ["plan.json", "ir.json", "schedule.txt", "spec.nest", *kernels]
    _report(
        fmt,
        f"{compilation.path}: compiled to {directory}/ ({', '.join(files)})",
        {"spec": compilation.path, "out": str(directory), "files": files},
    )


def _report(fmt: str, text: str, data: dict[str, Any]) -> None:
    """A command's closing message: one line of text, or one JSON object for editors and scripts."""
    click.echo(json.dumps(data) if fmt == "json" else text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _schedule_text(plan: Any) -> str:
    lines = [
        f"system {plan.system}: d={plan.d}, vocab={plan.vocab}, end-of-document id {plan.eod}",
        "",
        "layers, in evaluation order:",
    ]

    def walk(layers: Any, indent: str) -> None:
        for layer in layers:
            if layer.op == "memory":
                lv = plan.levels[layer.level]
                lines.append(
                    f"{indent}{layer.name}: matrix memory, {lv.heads} heads x {lv.d_value}x{lv.d_key}, "
                    f"{lv.objective} + {lv.optimizer} (decay {lv.decay}), update every {lv.chunk} "
                    f"token(s), read {lv.read}, outer gradient {lv.gradient}"
                )
            elif layer.op == "residual":
                lines.append(f"{indent}residual:")
                walk(layer.body, indent + "  ")
            else:
                lines.append(f"{indent}{layer.name}")

    walk(plan.layers, "  ")
    lines += ["", "outer optimizers (once per training step):"]
    lines += [
        f"  {o.name}: {o.kind} {o.hyper}, owns {'every other parameter' if o.default else o.owns_levels}"
        for o in plan.optimizers
    ]
    return "\n".join(lines) + "\n"


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    required=True,
    help="Output file: .svg, .png, .dot, .mmd (Mermaid) or .html (a report).",
)
@click.option("--view", type=click.Choice(["hierarchy", "gradients", "both"]), default="both", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Override a spec parameter.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def viz(spec: str, out: str, view: str, sets: tuple[str, ...], fmt: str) -> None:
    """Draw SPEC: its level hierarchy on the frequency axis and its gradient flow."""
    from . import viz as pictures

    if pictures.format_of(out) is None:
        raise UsageProblem(f"-o {out}: the picture format is chosen by the extension: .svg, .png, .dot, .mmd or .html")
    if not Path(out).parent.is_dir():
        raise UsageProblem(f"-o {out}: no such folder {str(Path(out).parent)!r}")
    compilation, _ = _compile(spec, sets, "text")
    kind = pictures.write(compilation, out, view)
    _report(
        fmt,
        f"{compilation.path}: wrote {out} ({kind}, {view})",
        {"spec": compilation.path, "out": out, "format": kind, "view": view},
    )


@cli.command()
@click.argument("code")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def explain(code: str, fmt: str) -> None:
    """Explain a diagnostic code, e.g. `nestc explain E020`."""
    text = codes.explain(code)
    if text is None:
        hint = suggest(code.upper(), codes.EXPLANATIONS) or "codes look like E020"
        raise UsageProblem(f"no diagnostic code {code!r}; {hint}")
    title, body = codes.EXPLANATIONS[code.upper()]
    _report(fmt, text, {"code": code.upper(), "title": title, "explanation": body})


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(exists=True), default=None, help="A text file or a folder of them.")
@click.option("--task", type=click.Choice(TRAIN_TASKS), default=None, help="Train on a generated task instead.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Total steps (or train.steps; 1000).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (required to train).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Run settings and spec parameters from a TOML file ([train], [optim], [spec]).",
)
@click.option("--print-config", is_flag=True, help="Print the resolved settings as TOML (for --config) and exit.")
@click.option("--tokenizer", default=None, help="byte (default) or tiktoken:<encoding>, e.g. tiktoken:cl100k_base.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="NAME=V",
    help="Spec parameter (d=128) or run setting (train.batch=16, optim.lr=1e-3).",
)
@click.option("--batch", type=click.IntRange(min=1), default=None)
@click.option("--seq-len", type=click.IntRange(min=2), default=None)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@FORCE
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def train(
    spec: str,
    data: str | None,
    task: str | None,
    steps: int | None,
    out: str | None,
    config_path: str | None,
    print_config: bool,
    tokenizer: str | None,
    sets: tuple[str, ...],
    batch: int | None,
    seq_len: int | None,
    backend: str,
    resume: bool,
    progress: bool,
    force: bool,
    fmt: str,
) -> None:
    """Train SPEC on a text corpus (or a generated task) with its outer optimizer levels.

    Under `torchrun --nproc-per-node N -m nestc train ...` the processes share each step (DDP, gloo)."""
    import torch

    from nestc_runtime.training import distributed, load_corpus, make_sampler
    from nestc_runtime.training import train as run_training

    flags = {"steps": steps, "batch": batch, "seq_len": seq_len, "tokenizer": tokenizer}
    compilation, settings, text_tokenizer = _resolve_train(spec, config_path, sets, flags)
    plan = to_plan(compilation)
    if print_config:
        from .train_config import to_toml

        click.echo(to_toml(settings, compilation.system.params, spec), nl=False)
        return
    if (data is None) == (task is None):
        raise UsageProblem("give either --data FILE (a text corpus) or --task NAME (generated data)")
    if out is None:
        raise UsageProblem("give --out DIR, the run directory")
    if task is not None and text_tokenizer.name != "byte":
        raise UsageProblem(f"--task data is byte-level; the tokenizer {text_tokenizer.name} applies to --data text")
    require_fits(plan, settings.batch, settings.seq_len, training=True, force=force, what=f"training `{plan.system}`")
    env = distributed.setup()
    torch.manual_seed(settings.seed)
    model = CompiledModel(plan, backend=backend)
    if task is not None:
        from nestc_runtime.evaluation import TaskSampler, get_task

        sampler: Any = TaskSampler(get_task(task), settings.batch, settings.seq_len, settings.seed)
        source = f"task {task} (generated)"
    else:
        tokens = load_corpus(data, tokenizer=text_tokenizer)  # type: ignore[arg-type]
        sampler, _ = make_sampler(tokens, settings)
        source = f"{data} ({tokens.numel():,} tokens)"
    directory = Path(out)
    if env.is_main:
        plan.save(directory)
    meta = {"system": plan.system, "source_hash": plan.source_hash, "params": plan.params}
    meta["tokenizer"] = text_tokenizer.name  # eval and generate read it back
    if task is not None:
        meta["task"] = task
    n_params = sum(p.numel() for p in model.parameters())
    if env.is_main:
        ranks = f", {env.world_size} processes" if env.active else ""
        click.echo(
            f"training `{plan.system}` ({n_params:,} parameters, backend {model.backend}{ranks}) on {source} "
            f"for {settings.steps} steps",
            err=True,
        )
    trained: torch.nn.Module = model
    if env.active:
        trained, sampler = distributed.DistributedModel(model), distributed.ShardedSampler(sampler, env)
    try:
        with distributed.run_folder(directory, env, resume) as folder:
            result = run_training(
                trained,
                model.optimizer_groups(),
                sampler,
                settings,
                folder,
                eod=plan.eod,
                resume=resume,
                progress=progress and env.is_main,
                extra_meta=meta,
            )
        for key in ("first_loss", "last_loss"):
            result[key] = distributed.mean_over_ranks(result[key], env)
    finally:
        trained = model  # the DDP wrapper goes while the process group still exists (see cleanup)
        distributed.cleanup(env)
    if not env.is_main:
        return
    summary = {k: result[k] for k in ("first_loss", "last_loss", "steps", "tokens_per_s")}
    summary["checkpoint"] = str(result["checkpoint"])
    if env.active:
        summary["processes"] = env.world_size
    text = (
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} after {summary['steps']} steps, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; checkpoint {summary['checkpoint']}"
    )
    _report(fmt, text, summary)


@cli.command(name="eval")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--ckpt", required=True, help="A ckpt-* folder, or a run folder (its newest checkpoint).")
@click.option("--task", type=click.Choice(EVAL_TASKS), required=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=True), default=None, help="Held-out text (ppl).")
@click.option(
    "--context",
    type=click.IntRange(min=2),
    default=None,
    help="ppl: score the text in separate pieces of N tokens, each from a fresh state (e.g. the training "
    "length); default: one stream.",
)
@click.option(
    "--examples",
    type=click.IntRange(min=1),
    default=None,
    help="Generated tasks: examples per row of the table (pair count, length x depth, length; continual: "
    "streams). Default 8 mqar, 3 niah, 4 memorize, 6 continual; more gives tighter figures.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated evaluation set.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Spec parameter, as in training (d=128).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@FORCE
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def eval_cmd(
    spec: str,
    ckpt: str,
    task: str,
    data: str | None,
    context: int | None,
    examples: int | None,
    seed: int,
    out: str | None,
    sets: tuple[str, ...],
    backend: str,
    force: bool,
    fmt: str,
) -> None:
    """Evaluate a trained checkpoint of SPEC on a generated task (mqar, niah, ppl, continual, memorize)."""
    from nestc_runtime.evaluation import (
        evaluate,
        get_task,
        model_predictor,
        render_table,
        write_json_atomic,
    )

    if out is not None and not Path(out).parent.is_dir():
        raise UsageProblem(f"--out {out}: no such folder {str(Path(out).parent)!r}")
    if task == "ppl" and data is None:
        raise UsageProblem("--task ppl needs --data FILE (held-out text)")
    if task != "ppl" and context is not None:
        raise UsageProblem(f"--context applies to --task ppl, not {task}")
    if task == "ppl" and examples is not None:
        raise UsageProblem("--examples applies to the generated tasks; ppl scores the whole --data text")
    tokenizer = _checkpoint_tokenizer(ckpt)
    if task != "ppl" and tokenizer.name != "byte":
        raise UsageProblem(f"--task {task} is byte-level; this checkpoint's tokenizer is {tokenizer.name} (ppl only)")
    explicit_vocab = "vocab" in parse_sets(sets)[0]
    compilation = _compile_for_tokenizer(spec, sets, {}, tokenizer, explicit_vocab)
    model, where = _load_trained(compilation, ckpt, backend, EVAL_TOKENS, force)
    if task == "ppl":
        chosen = get_task(task, path=data, tokenizer=tokenizer, context=context)
    else:
        chosen = get_task(task) if examples is None else get_task(task, per_group=examples)
    result = evaluate(model_predictor(model), chosen, seed=seed, vocab=model.plan.vocab)
    result.update(spec=compilation.path, checkpoint=str(where))
    if out is not None:
        write_json_atomic(out, result)
        result["out"] = out
    text = render_table(result) + (f"\nwrote {out}" if out else "")
    _report(fmt, text, result)


def _load_trained(
    compilation: Compilation, ckpt: str, backend: str, tokens: int, force: bool
) -> tuple[CompiledModel, Path]:
    from nestc_runtime.evaluation import load_trained

    plan = to_plan(compilation)
    require_fits(plan, 1, tokens, training=False, force=force, what=f"running `{plan.system}`")
    model = CompiledModel(plan, backend=backend)
    expected = {"system": plan.system, "source_hash": plan.source_hash, "params": plan.params}
    where = load_trained(model, ckpt, expected)
    model.eval()
    return model, where


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--ckpt", required=True, help="A ckpt-* folder, or a run folder (its newest checkpoint).")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample among the K likeliest tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Memory state file (safetensors): loaded if it exists, saved after generating.",
)
@click.option("--set", "sets", multiple=True, metavar="NAME=V", help="Spec parameter, as in training (d=128).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
@FORCE
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
def generate(
    spec: str,
    ckpt: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    state_path: str | None,
    sets: tuple[str, ...],
    backend: str,
    force: bool,
    fmt: str,
) -> None:
    """Continue PROMPT with a trained checkpoint of SPEC; inner levels keep learning while it generates."""
    from nestc_runtime.generation import generate as sample
    from nestc_runtime.generation import load_state, save_state

    if not prompt:
        raise UsageProblem("--prompt must not be empty")
    if state_path is not None and not Path(state_path).parent.is_dir():
        raise UsageProblem(f"--state {state_path}: no such folder {str(Path(state_path).parent)!r}")
    tokenizer = _checkpoint_tokenizer(ckpt)  # the one the checkpoint was trained with
    compilation = _compile_for_tokenizer(spec, sets, {}, tokenizer, "vocab" in parse_sets(sets)[0])
    model, where = _load_trained(compilation, ckpt, backend, len(prompt.encode()) + max_tokens, force)
    state, continued = None, False
    history: list[list[int]] | None = []  # the stream's calls, kept for models whose records need a replay
    if state_path is not None and Path(state_path).exists():
        state, saved = load_state(state_path, model)
        continued = True
        history = saved.get("history") if isinstance(saved.get("history"), list) else None
    new, state = sample(
        model,
        tokenizer.encode(prompt),
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        state=state,
        history=history,
    )
    if state_path is not None:
        save_state(state_path, model, state, history=history)
    text = tokenizer.decode(new)
    data = {
        "prompt": prompt,
        "text": text,
        "tokens": new,
        "checkpoint": str(where),
        "state": state_path,
        "continued": continued,
    }
    if fmt == "json":
        _report(fmt, "", data)
    else:
        click.echo(text)
        if state_path is not None:
            click.echo(f"state {'continued and ' if continued else ''}saved to {state_path}", err=True)


def _resolve_train(
    spec: str, config_path: str | None, sets: Sequence[str], flags: dict[str, Any]
) -> tuple[Compilation, Any, Any]:
    """The compiled spec, the TrainSettings and the tokenizer of a `train` run, by precedence: defaults <
    --config file < --set < explicit flags (see nestc/train_config.py)."""
    from pydantic import ValidationError

    from nestc_runtime.training import TrainSettings

    from .train_config import RunConfig, UsageProblemText, check_spec_params, load_config, merge_settings

    config = load_config(config_path) if config_path else RunConfig()
    set_params, set_settings = parse_sets(sets)
    try:
        values, origin = merge_settings(config.settings, set_settings, flags)
        settings = TrainSettings(**values)
    except UsageProblemText as exc:
        raise UsageProblem(str(exc)) from None
    except ValidationError as exc:  # the file was validated on its own: the culprit is a --set or a flag
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        raise UsageProblem(f"{origin.get(name, name)}: {first['msg']}") from None
    if config.params:
        check_spec_params(config, _declared_params(spec))
    tokenizer = _tokenizer(settings.tokenizer)
    compilation = _compile_for_tokenizer(
        spec, sets, config.params, tokenizer, explicit_vocab="vocab" in set_params, run_settings=True
    )
    return compilation, settings, tokenizer


def _declared_params(spec: str) -> list[str]:
    from .language.parser import parse
    from .pipeline import read_source

    try:
        return [param.name.id for param in parse(read_source(spec)).params]
    except CompileError:
        return []  # front_end reports the spec's own errors


def _tokenizer(name: str) -> Any:
    from nestc_runtime.training.tokenizers import TokenizerUnavailable, get_tokenizer

    try:
        return get_tokenizer(name)
    except TokenizerUnavailable as exc:
        raise UsageProblem(f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")) from None


def _compile_for_tokenizer(
    spec: str,
    sets: Sequence[str],
    params: dict[str, ParamValue],
    tokenizer: Any,
    explicit_vocab: bool,
    run_settings: bool = False,
) -> Compilation:
    """Compile with the spec's `vocab` parameter set to the tokenizer's vocabulary unless given explicitly."""
    base = dict(params)
    if tokenizer.name != "byte" and not explicit_vocab and "vocab" not in base:
        base["vocab"] = float(tokenizer.vocab_size)
    compilation, _ = _compile(spec, sets, "text", base_params=base, run_settings=run_settings)
    vocab = compilation.system.params.get("vocab")
    if vocab is not None and vocab != tokenizer.vocab_size:
        raise UsageProblem(
            f"the spec's vocab = {vocab:g} does not fit the tokenizer {tokenizer.name} ({tokenizer.vocab_size} ids, "
            "the last one ending documents); leave vocab unset or set it to that"
        )
    return compilation


def _checkpoint_tokenizer(ckpt: str) -> Any:
    """The tokenizer a checkpoint was trained with (its meta.json; `byte` when it does not say)."""
    from nestc_runtime.evaluation.scoring import resolve_checkpoint
    from nestc_runtime.training.checkpoint import META_FILE

    try:
        meta = json.loads((resolve_checkpoint(ckpt) / META_FILE).read_text(encoding="utf-8"))
        name = meta.get("extra", {}).get("tokenizer", "byte")
    except (OSError, ValueError, AttributeError, RuntimeInputError):
        name = "byte"  # loading the checkpoint itself reports what is wrong with it
    return _tokenizer(str(name))


# ---- the entry point: every failure becomes one clear message and an exit code ------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    code = _run(list(argv) if argv is not None else sys.argv[1:])
    if argv is None:
        sys.exit(code)
    return code


def _run(argv: list[str]) -> int:
    try:
        result = cli.main(args=argv, prog_name="nestc", standalone_mode=False)
        return int(result) if isinstance(result, int) else EXIT_OK
    except click.UsageError as exc:
        exc.show()
        return EXIT_USAGE
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except SpecFileError as exc:
        click.echo(click.style("error: ", fg="red", bold=True) + str(exc), err=True)
        return EXIT_USAGE
    except SpecError as exc:
        _print_diagnostics(exc.diagnostics, exc.sources, _format_flag(argv))
        return EXIT_INPUT
    except RuntimeInputError as exc:
        return _input_error(exc)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: one line, the traceback only on request
        if os.environ.get("NESTC_DEBUG") == "1":
            traceback.print_exc()
        click.echo(
            f"internal error (a bug in nestc): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            "; please report it with the output of NESTC_DEBUG=1",
            err=True,
        )
        return EXIT_BUG


def _input_error(exc: RuntimeInputError) -> int:
    from nestc_runtime.training.checkpoint import CheckpointMissing

    where = f"{exc.path}: " if exc.path else ""
    click.echo(click.style("error: ", fg="red", bold=True) + where + exc.message, err=True)
    snippet = getattr(exc, "snippet", "")  # a located error in a file (a config file's line with a caret)
    if snippet:
        click.echo(snippet, err=True)
    if exc.hint:
        click.echo(f"  = hint: {exc.hint}", err=True)
    return EXIT_USAGE if isinstance(exc, CheckpointMissing) else EXIT_INPUT


def _format_flag(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--format" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--format="):
            return arg.split("=", 1)[1]
    return "text"
