"""GPU benchmark of the generated Triton kernels (DESIGN §9, GPU part; issue #18). Needs a CUDA GPU.

Rows, forward and forward+backward, bf16 inputs, medians of `triton.testing.do_bench`:
  - nestc's generated matrix-memory kernel (`nestc_runtime.ops.matrix_memory.triton.triton_chunked`) for the
    delta rule (`l2`, `gd`, every token, read online) and the gated delta rule (`decay before`, per-head α);
  - flash-linear-attention's `chunk_delta_rule` and `chunk_gated_delta_rule` on the same tensors, with
    `scale = 1` (its default scales queries by d^-1/2) and `beta` = η, `g` = log α;
  at flash-linear-attention's own benchmark shapes (benchmarks/ops/benchmark_delta_rule.py: model width 2048,
  H = 2048 / head dim, (B, T) in (8, 2048), (4, 4096), (2, 8192)) for head dims 64 and 128 (256 has no
  nestc kernel), plus the awkward lengths T = 2047 and 4097;
  - the roofline: achieved GB/s (bytes of q, k, v, o, η, α and the per-block states the kernel writes)
    against the measured device copy rate, and TFLOP/s (the kernel's matmul FLOPs, counted below) against
    the measured bf16 matmul rate;
  - the Titans MLP memory (d = 256, 4 heads, chunk 16, batch 2, T = 1024): nestc's titans_lmm memory level on
    the GPU (momentum and per-channel retention: no generated kernel covers it, so this is the chunked PyTorch
    path), nestc's generated MLP kernel on the nearest covered model (the same MLP x + LN(W1 silu(W2 x)) and
    sizes, `gd` with a per-head retention; forward and forward+backward), and titans-pytorch's NeuralMemory,
    when installed.
Targets (issue #18): within 1.2x of flash-linear-attention's time on its shapes; >= 10x titans-pytorch.

Run: python bench/kernels_gpu.py [--quick]; results go to bench/results/kernels_gpu.{json,md}.
Without CUDA the script says so and exits with status 2 (nothing is measured on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).parents[1]
SHAPES = [(8, 2048), (4, 4096), (2, 8192), (8, 2047), (4, 4097)]  # (B, T); H = 2048 / head dim
HEAD_DIMS = (64, 128)
WIDTH = 2048


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print("bench/kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
        sys.exit(2)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn (triton's do_bench: warm-up, cache flush, many repeats)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def device_rates() -> dict[str, float]:
    """The machine's own copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s)."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = bench(lambda: a @ a)
    return {"copy_GBps": 2 * x.numel() / copy_ms / 1e6, "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def kernel_cost(B: int, T: int, H: int, D: int, block: int = 64) -> tuple[float, float]:
    """(bytes, FLOPs) of one forward call. Bytes: q, k, v, o in bf16, η and log α in fp32, and the fp32 state
    at every block start. FLOPs per block (2 per multiply-add): S_0 k and S_0 q and the state update (3 D²
    per token), K Kᵀ, Q Kᵀ, the solve's product and the intra-block read (4 block·D per token), and the
    forward substitution (block² per token)."""
    blocks = -(-T // block)
    bytes_ = B * H * (4 * T * D * 2 + 2 * T * 4 + blocks * D * D * 4)
    flops = B * H * T * (2 * (3 * D * D + 4 * block * D) + block * block)
    return float(bytes_), float(flops)


def delta_inputs(B: int, T: int, H: int, D: int, gated: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device="cuda", generator=g), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    beta = torch.rand(B, T, H, device="cuda", generator=g).sigmoid()
    log_alpha = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 4) if gated else None
    out = {"q": q, "k": k, "v": v, "beta": beta}
    if log_alpha is not None:
        out["g"] = log_alpha
    return {name: x.requires_grad_() for name, x in out.items()}


def nestc_call(x: dict[str, torch.Tensor], gated: bool) -> Callable[[], torch.Tensor]:
    from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState
    from nestc_runtime.ops.matrix_memory.triton import triton_chunked

    cfg = MatrixMemoryConfig(objective="l2", decay="before" if gated else "after", chunk=1, read="online")
    B, T, H, D = x["q"].shape
    init = torch.zeros(H, D, D, device="cuda")

    def run() -> torch.Tensor:
        # nestc's layout is (B, H, T, D): the transposes are views (the op makes them contiguous)
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
        lr = x["beta"].transpose(1, 2)
        retain = x["g"].exp().transpose(1, 2) if gated else torch.ones_like(lr)
        o, _ = triton_chunked(q, k, v, lr, retain, MatrixMemoryState.initial(init, B), cfg)
        return o

    return run


def fla_call(x: dict[str, torch.Tensor], gated: bool) -> Callable[[], torch.Tensor]:
    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return lambda: chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=1.0)[0]
    from fla.ops.delta_rule import chunk_delta_rule

    return lambda: chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=1.0)[0]


def timed(call: Callable[[], torch.Tensor]) -> dict[str, float]:
    forward = bench(lambda: call())
    fwd_bwd = bench(lambda: call().float().sum().backward())
    return {"fwd_ms": forward, "fwd_bwd_ms": fwd_bwd}


def delta_rows(rates: dict[str, float], quick: bool) -> list[dict[str, Any]]:
    rows = []
    for gated in (False, True):
        for D in HEAD_DIMS:
            for B, T in SHAPES[:1] if quick else SHAPES:
                H = WIDTH // D
                x = delta_inputs(B, T, H, D, gated)
                row: dict[str, Any] = {"op": "gated_delta_rule" if gated else "delta_rule", "B": B, "T": T, "H": H}
                row["D"] = D
                row["nestc"] = timed(nestc_call(x, gated))
                bytes_, flops = kernel_cost(B, T, H, D)
                row["nestc_GBps"] = bytes_ / row["nestc"]["fwd_ms"] / 1e6
                row["nestc_TFLOPs"] = flops / row["nestc"]["fwd_ms"] / 1e9
                row["roofline_bw_fraction"] = row["nestc_GBps"] / rates["copy_GBps"]
                row["roofline_mm_fraction"] = row["nestc_TFLOPs"] / rates["matmul_TFLOPs"]
                try:
                    row["fla"] = timed(fla_call(x, gated))
                    row["ratio_fwd"] = row["nestc"]["fwd_ms"] / row["fla"]["fwd_ms"]
                    row["ratio_fwd_bwd"] = row["nestc"]["fwd_bwd_ms"] / row["fla"]["fwd_bwd_ms"]
                except ImportError as exc:
                    row["fla"] = f"not installed ({exc})"
                print(row, flush=True)
                rows.append(row)
    return rows


def mlp_rows() -> list[dict[str, Any]]:
    """Titans memory (d = 256, 4 heads, C = 16, B = 2, T = 1024): nestc's MLP memory level vs titans-pytorch."""
    import nestc

    d, H, C, B, T = 256, 4, 16, 2, 1024
    model = nestc.compile(ROOT / "specs" / "titans_lmm.nest", backend="chunked", d=d, heads=H, layers=1).cuda()
    level = model.levels["memory"]
    h = torch.randn(B, T, d, device="cuda")
    like = next(model.parameters())
    row: dict[str, Any] = {"op": "titans_mlp_memory", "B": B, "T": T, "d": d, "heads": H, "chunk": C}
    row["nestc_chunked_fwd_ms"] = bench(
        lambda: level.forward_window(h, level.init_state(B, like), None, None, reference=False)
    )
    row.update(mlp_kernel_times(B, T, d // H, H, C))
    try:
        from titans_pytorch import NeuralMemory

        peer = NeuralMemory(dim=d, dim_head=d // H, heads=H, chunk_size=C).cuda()
        row["titans_pytorch_fwd_ms"] = bench(lambda: peer(h))
        row["ratio_peer_over_nestc"] = row["titans_pytorch_fwd_ms"] / row["nestc_chunked_fwd_ms"]
    except ImportError as exc:
        row["titans_pytorch"] = f"not installed ({exc})"
    print(row, flush=True)
    return [row]


def mlp_kernel_times(B: int, T: int, d: int, H: int, C: int) -> dict[str, float]:
    """The generated MLP-memory kernel (gd, per-head retention, LN), per head d, hidden 4d, bf16 inputs."""
    from nestc_runtime.ops.mlp_memory import MLPMemoryConfig, MLPMemoryState
    from nestc_runtime.ops.mlp_memory.triton import triton_chunked, why_not

    cfg = MLPMemoryConfig(objective="l2", chunk=C, read="online", norm=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(3))
    lr = torch.full((B, H, T), 0.1, device="cuda")
    retain = torch.full((B, H, T), 0.99, device="cuda")
    w1 = (torch.randn(H, d, 4 * d, device="cuda", generator=g) / (4 * d) ** 0.5).requires_grad_()
    w2 = (torch.randn(H, 4 * d, d, device="cuda", generator=g) / d**0.5).requires_grad_()
    reason = why_not(cfg, q, retain, MLPMemoryState.initial(w1, w2, B))
    if reason is not None:
        return {"nestc_mlp_kernel": reason}  # type: ignore[dict-item]

    def call() -> torch.Tensor:
        return triton_chunked(q, k, v, lr, retain, MLPMemoryState.initial(w1, w2, B), cfg)[0]

    times = timed(call)
    return {"nestc_mlp_kernel_fwd_ms": times["fwd_ms"], "nestc_mlp_kernel_fwd_bwd_ms": times["fwd_bwd_ms"]}


def write(results: dict[str, Any]) -> None:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Generated kernels on {results['device']}", "", f"rates: {results['rates']}", ""]
    lines += ["| op | D | B | T | nestc fwd ms | fla fwd ms | ratio fwd | ratio fwd+bwd | GB/s | TFLOP/s |"]
    lines += ["|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["delta"]:
        fla = r["fla"]["fwd_ms"] if isinstance(r["fla"], dict) else "-"
        lines.append(
            f"| {r['op']} | {r['D']} | {r['B']} | {r['T']} | {r['nestc']['fwd_ms']:.3f} | {fla} | "
            f"{r.get('ratio_fwd', '-')} | {r.get('ratio_fwd_bwd', '-')} | {r['nestc_GBps']:.0f} | "
            f"{r['nestc_TFLOPs']:.1f} |"
        )
    lines += ["", f"MLP memory: {results['mlp']}"]
    (out / "kernels_gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per head dim")
    args = parser.parse_args()
    refuse_without_cuda()
    import nestc.codegen

    nestc.codegen.install()
    rates = device_rates()
    print(f"device {torch.cuda.get_device_name()}: {rates}", flush=True)
    results = {"device": torch.cuda.get_device_name(), "rates": rates}
    results["delta"] = delta_rows(rates, args.quick)
    results["mlp"] = mlp_rows()
    write(results)


if __name__ == "__main__":
    main()
