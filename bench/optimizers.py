"""AdamW vs Muon vs M3 as outer optimizer levels, on one small model and one budget (CPU).

The model is `specs/transformer_muon.nest` at d = 64, 2 layers, 4 heads; the three runs differ only in the
optimizer level that trains its matrices (the embeddings, head and gains stay with the same AdamW level):
    adamw: adamw(lr = 3e-3, weight_decay = 0.1) · muon: muon(lr = 0.02, momentum = 0.95) · m3: m3(lr, eps).
Same initial weights (seed 0), same batches (the sampler's seed), same steps, schedule and clipping; the
corpus is the standard library's asyncio sources (bytes), with its last 5% held out for the final loss.

    python bench/optimizers.py [--steps 100] [--m3-lr 3e-4] [--m3-eps 1e-3]

Writes bench/results/optimizers.png (training-loss curves) and bench/results/optimizers.md (a table).
"""

from __future__ import annotations

import argparse
import re
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import nestc
from nestc_runtime.training import TrainSettings, load_corpus, make_sampler, next_token_loss, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIZES = {"d": 64, "heads": 4, "layers": 2}
MUON_LINE = re.compile(r"optimizer muon\([^)]*\)")


def spec_text(matrix_optimizer: str) -> str:
    """transformer_muon.nest with the matrices' optimizer replaced."""
    text = (ROOT / "specs" / "transformer_muon.nest").read_text()
    assert MUON_LINE.search(text), "the muon level of transformer_muon.nest moved"
    return MUON_LINE.sub(f"optimizer {matrix_optimizer}", text)


def held_out_loss(model: torch.nn.Module, held_out: torch.Tensor, seq_len: int, rows: int = 16) -> float:
    usable = (held_out.numel() - 1) // (seq_len + 1) * (seq_len + 1)
    windows = held_out[:usable].view(-1, seq_len + 1)[:rows]
    model.eval()
    with torch.no_grad():
        loss = next_token_loss(model(windows[:, :-1]), windows, 256)
    model.train()
    return float(loss)


def run(name: str, text: str, tokens: torch.Tensor, settings: TrainSettings, out: Path) -> dict:
    spec = out / f"{name}.nest"
    spec.write_text(text)
    torch.manual_seed(0)
    model = nestc.compile(spec, **SIZES)
    sampler, held_out = make_sampler(tokens, settings)
    started = time.perf_counter()
    result = train(model, model.optimizer_groups(), sampler, settings, out / name, progress=False)
    seconds = time.perf_counter() - started
    curve = [(r["step"], r["loss"]) for r in read_metrics(out / name / "metrics.jsonl")]
    final = held_out_loss(model, held_out, settings.seq_len)
    return {"name": name, "curve": curve, "held_out": final, "seconds": seconds, **result}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['name']} (held-out {r['held_out']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte, mean over 5 steps)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict], settings: TrainSettings, optimizers: dict[str, str], corpus: str) -> str:
    lines = [
        "# Outer optimizers: AdamW vs Muon vs M3 (CPU)",
        "",
        f"`python bench/optimizers.py --steps {settings.steps}`: transformer_muon.nest at d = 64, 2 layers, 4 heads,",
        f"batch {settings.batch} x {settings.seq_len} bytes, {settings.steps} steps ({settings.warmup} warm-up, cosine"
        f" to 10%), grad clip {settings.grad_clip}, seed {settings.seed}; corpus {corpus}, last 5% held out.",
        "Embeddings, head and gains: adamw(lr = 3e-3, weight_decay = 0.1) in every run. Learning rates are not tuned:",
        "adamw's and muon's are the usual defaults; m3's (lr 3e-4, eps 1e-3) was picked after two 40-step",
        "trials (1e-4, 3e-4).",
        "Timings are on a shared, loaded 2-core machine (load average about 10): compare them only within this table.",
        "",
        "| run | matrices' optimizer | first loss (5-step mean) | last loss (5-step mean) | held-out loss | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | `{optimizers[r['name']]}` | {r['curve'][0][1]:.3f} | {r['curve'][-1][1]:.3f} | "
            f"{r['held_out']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--m3-lr", type=float, default=3e-4)
    parser.add_argument("--m3-eps", type=float, default=1e-3)
    parser.add_argument("--only", nargs="*", default=None, help="run only these (adamw, muon, m3)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "asyncio"
    tokens = load_corpus(corpus)
    settings = TrainSettings(
        steps=args.steps, batch=4, seq_len=128, warmup=10, log_every=5, holdout=0.05, seed=0, grad_clip=1.0
    )
    optimizers = {
        "adamw": "adamw(lr = 3e-3, weight_decay = 0.1)",
        "muon": "muon(lr = 0.02, momentum = 0.95, steps = 5)",
        "m3": f"m3(lr = {args.m3_lr:g}, slow_every = 10, eps = {args.m3_eps:g})",
    }
    names = args.only or list(optimizers)
    with tempfile.TemporaryDirectory() as scratch:
        results = [run(n, spec_text(optimizers[n]), tokens, settings, Path(scratch)) for n in names]
    for r in results:
        print(f"{r['name']:6s} first {r['curve'][0][1]:.3f} last {r['curve'][-1][1]:.3f} "
              f"held-out {r['held_out']:.3f} {r['seconds']:.0f}s")  # fmt: skip
    if args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus_name = f"asyncio ({tokens.numel():,} bytes)"
    plot(results, RESULTS / "optimizers.png", f"transformer d=64, {settings.steps} steps, same data and init")
    (RESULTS / "optimizers.md").write_text(table(results, settings, optimizers, corpus_name))


if __name__ == "__main__":
    main()
