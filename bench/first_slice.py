"""Benchmark of the first slice (DESIGN §9 protocol, CPU part): one run, medians, a table of ratios.

For each matrix-memory spec at T = 1024: the compiled model's forward with the chunked runtime vs the
reference interpreter (same parameters, same inputs), and training throughput (forward + backward + AdamW).
Run:  python bench/first_slice.py [--d 256 --heads 4 --layers 2 --batch 2 --seq 1024 --repeats 5]
Results are printed and written to bench/results/first_slice.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nestc

SPECS = ("linear_attention", "deltanet", "gated_deltanet")
ROOT = Path(__file__).parents[1]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def bench_spec(spec: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    sizes = {"d": args.d, "heads": args.heads, "layers": args.layers}
    model = nestc.compile(ROOT / "specs" / f"{spec}.nest", **sizes)
    tokens = torch.randint(0, 256, (args.batch, args.seq))
    row: dict[str, float] = {}
    with torch.no_grad():
        model.backend = "chunked"
        row["chunked_fwd_s"] = median_seconds(lambda: model(tokens), args.repeats)
        model.backend = "reference"
        row["reference_fwd_s"] = median_seconds(lambda: model(tokens), max(1, args.repeats // 2))
    model.backend = "chunked"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step() -> None:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    row["train_step_s"] = median_seconds(train_step, args.repeats)
    n_tokens = args.batch * args.seq
    row["speedup_vs_reference"] = row["reference_fwd_s"] / row["chunked_fwd_s"]
    row["chunked_fwd_tok_s"] = n_tokens / row["chunked_fwd_s"]
    row["train_tok_s"] = args.batch * (args.seq - 1) / row["train_step_s"]
    row["params"] = float(sum(p.numel() for p in model.parameters()))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first_slice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = matmul_gflops()
    rows = {spec: bench_spec(spec, args) for spec in SPECS}
    header = f"{'spec':18} {'chunked fwd':>12} {'reference fwd':>14} {'ratio':>7} {'fwd tok/s':>10} {'train tok/s':>12}"
    print(f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, matmul {rate:.0f} GFLOP/s")
    sizes = f"d={args.d} heads={args.heads} layers={args.layers} batch={args.batch} T={args.seq}"
    print(f"{sizes}; medians of {args.repeats}")
    print(header)
    for spec, r in rows.items():
        print(
            f"{spec:18} {r['chunked_fwd_s'] * 1e3:10.1f}ms {r['reference_fwd_s'] * 1e3:12.1f}ms "
            f"{r['speedup_vs_reference']:6.1f}x {r['chunked_fwd_tok_s']:10.0f} {r['train_tok_s']:12.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"config": config, "matmul_gflops": rate, "results": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
