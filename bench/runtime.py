"""Benchmark of the runtime (DESIGN §9 protocol, CPU part): one run, medians, a table of ratios.

Part 1, the Titans memory (LMM) at d = 256, 4 heads (head dim 64, MLP hidden 256), chunk C = 16, batch 2,
T = 1024, fp32, forward under no_grad unless marked fwd+bwd:
  - nestc's memory level alone (`specs/titans_lmm.nest`, d=256 heads=4 layers=1, `model.levels["memory"]`):
    `level.forward_window(h, level.init_state(B, like), None, None, reference=False)` on random h (B, T, d),
    against the same level with reference=True (the per-token oracle);
  - a straightforward chunk loop written here (the chunked dual form of the same residual 2-layer MLP memory
    with LayerNorm, momentum and per-channel retention, plain PyTorch, a Python loop over chunks; it uses the
    level's own projections), eager and `torch.compile`d (the per-chunk step is compiled);
  - titans-pytorch's `NeuralMemory(dim=256, dim_head=64, heads=4, chunk_size=16)` (default memory model:
    MemoryMLP depth 2, expansion 4 -> hidden 256, ResidualNorm), forward and forward+backward;
  - the whole compiled titans_lmm model (1 layer), chunked vs reference.
Part 2, HOPE at d = 256, 2 layers, 4 heads, CMS chunks 16/64/256, batch 2, T = 512, forward+backward
(cross-entropy on next-token logits): nestc's specs/hope.nest, hope_attention.nest and titans_mal.nest when
they compile (else the E040 message), and nested-learning's HOPEModel (block_variant hope_selfmod, the one
hope.nest describes: self-mod chunk 8, memory chunk 64; and hope_attention).

FLOPs of a row are those of nestc's reference interpreter on the same work, counted with
torch.utils.flop_counter.FlopCounterMode at a shorter T (--flop-seq) and scaled linearly to T.

Part 3, the compiled scan (W003): a matrix memory with `momentum_gd` every token (no parallel form), batch 2,
4 heads, d_head = d / heads, T = 256 (--scan-seq), fp32 forward+backward, run by the eager per-token loop over
the reference step and by the compiled scan (its first call, which compiles, is reported apart).

Run (peers live in a separate venv):  python bench/runtime.py [--repeats 5 --threads 2]
Results are printed and written to bench/results/runtime.json and bench/results/runtime.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import nestc

ROOT = Path(__file__).parents[1]


# ---------------------------------------------------------------- timing and rates


def measure(fn: Callable[[], object], repeats: int, slow_s: float = 10.0) -> dict[str, Any]:
    """Median wall time of `fn`. The first call is a warm-up; if it alone takes over `slow_s` seconds the
    run is too slow to repeat and that single (cold) time is what is reported (`samples` says so)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    print(f"  [{time.strftime('%H:%M:%S')}] first call {first:.2f} s", flush=True)
    if first > slow_s:
        return {"s": first, "samples": [first], "note": "single cold run"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"s": statistics.median(times), "samples": times}


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / measure(lambda: a @ b, repeats)["s"] / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------- the straightforward chunk loop


def _ln(z: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    centred = z - z.mean(-1, keepdim=True)
    r = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return centred * r, r


def chunk_step(
    W1: Tensor,
    W2: Tensor,
    M1: Tensor,
    M2: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    alpha: Tensor,
    beta: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunk of the Titans memory, dual form (no per-token weights), per batch row and head:

    M(x) = x + LN(W1 silu(W2 x)); g_t = ∇ ½‖M(k_t) − v_t‖² at the chunk-start state; m_t = β_t m_{t−1} − η_t g_t;
    W_t = α_t ⊙ W_{t−1} + m_t (α per channel: W2·diag(α), diag(α)·W1); o_t = M_{W_t}(q_t) (online read).
    W1 (B,H,d,h), W2 (B,H,h,d), M1, M2 the momenta; q, k, v, alpha (B,H,C,d); eta, beta (B,H,C).
    """
    C = q.shape[2]
    # per-token gradient factors at the chunk start: g1 = δ sᵀ, g2 = u kᵀ
    a = k @ W2.transpose(-1, -2)
    s = F.silu(a)
    n, r = _ln(s @ W1.transpose(-1, -2))
    e = k + n - v
    delta = r * (e - e.mean(-1, keepdim=True) - n * (e * n).mean(-1, keepdim=True))
    sig = torch.sigmoid(a)
    u = (delta @ W1) * (sig * (1 + a * (1 - sig)))
    # decays: A_t = α_0⋯α_t (per channel), B_t = β_0⋯β_t
    log_a = torch.log(alpha.clamp_min(1e-30)).cumsum(2)  # (B,H,C,d)
    log_b = torch.log(beta.clamp_min(1e-30)).cumsum(2)  # (B,H,C)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    E = torch.where(lower[:, :, None], log_a[:, :, :, None, :] - log_a[:, :, None, :, :], -math.inf).exp()  # [t,r,i]
    Bm = torch.where(lower, log_b[..., :, None] - log_b[..., None, :], -math.inf).exp()  # [r,s] = B_r / B_s
    Bv = log_b.exp()
    Fm = torch.einsum("bhrs,bhtri->bhtsi", Bm, E)  # Σ_r (A_t/A_r)(B_r/B_s)
    G = torch.einsum("bhr,bhtri->bhti", Bv, E)  # Σ_r (A_t/A_r) B_r
    A = log_a.exp()
    # reads at W_t
    kq = torch.einsum("bhtsi,bhti,bhsi->bhts", Fm, q, k) * eta[:, :, None, :]
    pre = (A * q) @ W2.transpose(-1, -2) + (G * q) @ M2.transpose(-1, -2) - kq @ u
    p = F.silu(pre)
    ps = (p @ s.transpose(-1, -2)) * eta[:, :, None, :]
    z = (
        A * (p @ W1.transpose(-1, -2))
        + G * (p @ M1.transpose(-1, -2))
        - torch.einsum("bhts,bhtsi,bhsi->bhti", ps, Fm, delta)
    )
    out = q + _ln(z)[0]
    # the state after the chunk
    Fl, Gl, Al = Fm[:, :, -1], G[:, :, -1], A[:, :, -1]
    eu = eta[..., None] * u
    W2n = W2 * Al[:, :, None, :] + M2 * Gl[:, :, None, :] - eu.transpose(-1, -2) @ (k * Fl)
    W1n = W1 * Al[..., None] + M1 * Gl[..., None] - (eta[..., None] * Fl * delta).transpose(-1, -2) @ s
    bl = (Bm[:, :, -1] * eta)[..., None]  # (B,H,C,1)
    BC = Bv[:, :, -1, None, None]
    M2n = BC * M2 - (bl * u).transpose(-1, -2) @ k
    M1n = BC * M1 - (bl * delta).transpose(-1, -2) @ s
    return out, W1n, W2n, M1n, M2n


def chunk_loop(step: Callable[..., Any], x: dict[str, Tensor], init1: Tensor, init2: Tensor, chunk: int) -> Tensor:
    """The straightforward loop over chunks: x from the level's projections (B,H,T,·)."""
    q, k, v = x["queries"], x["keys"], x["values"]
    batch = q.shape[0]
    W1 = init1.unsqueeze(0).expand(batch, *init1.shape).contiguous()
    W2 = init2.unsqueeze(0).expand(batch, *init2.shape).contiguous()
    M1, M2 = torch.zeros_like(W1), torch.zeros_like(W2)
    outs = []
    for pos in range(0, q.shape[2], chunk):
        sl = slice(pos, pos + chunk)
        o, W1, W2, M1, M2 = step(
            W1,
            W2,
            M1,
            M2,
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            x["lr"][:, :, sl],
            x["retain"][:, :, sl],
            x["momentum"][:, :, sl],
        )
        outs.append(o)
    return torch.cat(outs, 2)


# ---------------------------------------------------------------- part 1: the Titans memory


def titans_memory(args: argparse.Namespace, rows: list[dict[str, Any]], notes: dict[str, Any]) -> None:
    torch.manual_seed(0)
    B, T, d, H, C = args.batch, args.seq, args.d, args.heads, args.chunk
    model = nestc.compile(ROOT / "specs" / "titans_lmm.nest", d=d, heads=H, layers=1, chunk=C)
    level = model.levels["memory"]
    like = next(model.parameters())
    h = torch.randn(B, T, d)
    n_tok = B * T
    config = f"d={d} heads={H} (head dim {d // H}, MLP hidden {4 * d // H}) C={C} B={B} T={T} fp32"

    def nestc_fwd(reference: bool, hh: Tensor = h) -> Tensor:
        return level.forward_window(hh, level.init_state(B, like), None, None, reference=reference)[0]

    def loop_fwd(step: Callable[..., Any], hh: Tensor = h) -> Tensor:
        x, _ = level.inputs(hh, level.init_state(B, like), None)
        out = chunk_loop(step, x, level.init1, level.init2, C)
        return out.transpose(1, 2).flatten(-2)

    # correctness of the hand-written loop against nestc's oracle (short T)
    with torch.no_grad():
        hs = h[:, : 4 * C]
        ref = nestc_fwd(True, hs)
        mine = loop_fwd(chunk_step, hs)
        notes["loop_vs_reference_max_abs_diff"] = float((ref - mine).abs().max())
        notes["chunked_vs_reference_max_abs_diff"] = float((ref - nestc_fwd(False, hs)).abs().max())

    flop_h = h[:, : args.flop_seq]
    scale = T / args.flop_seq
    with torch.no_grad():
        fwd_flops = count_flops(lambda: nestc_fwd(True, flop_h)) * scale
    bwd_flops = count_flops(lambda: nestc_fwd(True, flop_h.clone().requires_grad_()).sum().backward())
    bwd_flops *= args.fb_seq / args.flop_seq
    model.zero_grad()
    notes["flops_note"] = f"reference FLOPs counted at T={args.flop_seq}, scaled x{scale:g} (the op is linear in T)"

    times: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        times["chunked"] = measure(lambda: nestc_fwd(False), args.repeats)
        times["reference"] = measure(lambda: nestc_fwd(True), max(1, args.repeats // 2))
        times["loop_eager"] = measure(lambda: loop_fwd(chunk_step), args.repeats)
        compiled = torch.compile(chunk_step, dynamic=False, fullgraph=True)
        start = time.perf_counter()
        loop_fwd(compiled)
        notes["torch_compile_first_call_s"] = time.perf_counter() - start
        times["loop_compiled"] = measure(lambda: loop_fwd(compiled), args.repeats)

    def backward(out: Tensor) -> None:
        out.sum().backward()
        model.zero_grad(set_to_none=True)

    hb = h[:, : args.fb_seq]  # fwd+bwd rows run at a shorter T (the per-token backward is slow)
    times["chunked_fb"] = measure(lambda: backward(nestc_fwd(False, hb)), max(1, args.repeats // 2))
    times["loop_eager_fb"] = measure(lambda: backward(loop_fwd(chunk_step, hb)), args.repeats)

    peer: dict[str, Any] = {}
    try:
        from titans_pytorch import NeuralMemory

        torch.manual_seed(0)
        mem = NeuralMemory(dim=d, dim_head=d // H, heads=H, chunk_size=C)
        with torch.no_grad():
            peer["fwd"] = measure(lambda: mem(h), args.repeats)

        def peer_fb() -> None:
            out, _ = mem(h[:, : args.fb_seq])
            out.sum().backward()
            mem.zero_grad(set_to_none=True)

        peer["fb"] = measure(peer_fb, args.repeats)
        peer["config"] = f"NeuralMemory(dim={d}, dim_head={d // H}, heads={H}, chunk_size={C}), MemoryMLP depth 2 x4"
        peer["params"] = sum(p.numel() for p in mem.parameters())
    except ImportError as exc:
        peer["error"] = f"titans-pytorch not installed: {exc}"

    def row(name: str, key: str, flops: float, **extra: Any) -> dict[str, Any]:
        t = times[key]["s"]
        fb = key.endswith("_fb")
        r = {
            "part": "titans_memory",
            "row": name,
            "config": config.replace(f"T={T}", f"T={args.fb_seq}") if fb else config,
            "s": t,
            "tok_s": (B * args.fb_seq if fb else n_tok) / t,
            "ref_flops": flops,
            "gflop_s": flops / t / 1e9,
            "samples": times[key]["samples"],
        }
        r.update(extra)
        return r

    ref_s = times["reference"]["s"]
    common = {
        "x_reference": ref_s / times["chunked"]["s"],
        "x_loop_eager": times["loop_eager"]["s"] / times["chunked"]["s"],
        "x_loop_compiled": times["loop_compiled"]["s"] / times["chunked"]["s"],
    }
    if "fwd" in peer:
        common["x_titans_pytorch"] = peer["fwd"]["s"] / times["chunked"]["s"]
    rows.append(row("nestc level chunked, fwd", "chunked", fwd_flops, **common))
    rows.append(row("nestc level reference, fwd", "reference", fwd_flops, x_reference=1.0))
    for key, name in (("loop_eager", "chunk loop eager, fwd"), ("loop_compiled", "chunk loop torch.compile, fwd")):
        extra = {"x_reference": ref_s / times[key]["s"]}
        if "fwd" in peer:
            extra["x_titans_pytorch"] = peer["fwd"]["s"] / times[key]["s"]
        rows.append(row(name, key, fwd_flops, **extra))
    fb_extra = {"x_loop_eager": times["loop_eager_fb"]["s"] / times["chunked_fb"]["s"]}
    if "fb" in peer:
        fb_extra["x_titans_pytorch"] = peer["fb"]["s"] / times["chunked_fb"]["s"]
    rows.append(row("nestc level chunked, fwd+bwd", "chunked_fb", bwd_flops, **fb_extra))
    rows.append(row("chunk loop eager, fwd+bwd", "loop_eager_fb", bwd_flops))
    for key, name in (("fwd", "titans-pytorch NeuralMemory, fwd"), ("fb", "titans-pytorch NeuralMemory, fwd+bwd")):
        if key in peer:
            t = peer[key]["s"]
            rows.append(
                {
                    "part": "titans_memory",
                    "row": name,
                    "config": peer["config"] + f", B={B} T={args.fb_seq if key == 'fb' else T}",
                    "s": t,
                    "tok_s": B * (args.fb_seq if key == "fb" else T) / t,
                    "samples": peer[key]["samples"],
                }
            )
    if "error" in peer:
        rows.append({"part": "titans_memory", "row": "titans-pytorch NeuralMemory", "error": peer["error"]})

    # the whole compiled model (embed -> residual(rmsnorm -> memory -> linear) -> swiglu -> head), 1 layer
    tokens = torch.randint(0, 256, (B, T))
    with torch.no_grad():
        mflops = count_flops(lambda: _with_backend(model, "reference", tokens[:, : args.flop_seq])) * scale
        model.backend = "chunked"
        mc = measure(lambda: model(tokens), args.repeats)
        model.backend = "reference"
        mr = measure(lambda: model(tokens), max(1, args.repeats // 2))
    for name, m, extra in (
        ("nestc titans_lmm model (1 layer) chunked, fwd", mc, {"x_reference": mr["s"] / mc["s"]}),
        ("nestc titans_lmm model (1 layer) reference, fwd", mr, {"x_reference": 1.0}),
    ):
        rows.append(
            {
                "part": "titans_memory",
                "row": name,
                "config": config + " (model: embed, memory block, swiglu, head)",
                "s": m["s"],
                "tok_s": n_tok / m["s"],
                "ref_flops": mflops,
                "gflop_s": mflops / m["s"] / 1e9,
                "samples": m["samples"],
                **extra,
            }
        )

    if args.profile:
        notes["profile_level_chunked_fwd"] = profile_top(lambda: nestc_fwd(False, h[:, : args.profile_seq]), args.top)
        notes["profile_level_chunked_fwd_T"] = args.profile_seq
        notes["profile_loop_eager_fwd"] = profile_top(lambda: loop_fwd(chunk_step, h[:, : args.profile_seq]), args.top)
        if "fwd" in peer:
            notes["profile_titans_pytorch_fwd"] = profile_top(lambda: mem(h[:, : args.profile_seq]), args.top)


def _with_backend(model: Any, backend: str, tokens: Tensor) -> Tensor:
    old = model.backend
    model.backend = backend
    try:
        return model(tokens)
    finally:
        model.backend = old


def profile_top(fn: Callable[[], object], top: int) -> list[dict[str, Any]]:
    """The ops with the most self CPU time (torch.profiler), under no_grad."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round(e.self_cpu_time_total / 1e3, 2),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in events[:top]
    ]


# ---------------------------------------------------------------- part 2: HOPE


def hope(args: argparse.Namespace, rows: list[dict[str, Any]], notes: dict[str, Any]) -> None:
    """HOPE-sized models, fwd+bwd. nestc's rows run at --hope-nestc-seq tokens (512, as the peer: 11 s for nestc's
    HOPE since its CMS chunk-end passes stopped walking the whole call's graph, more than 10 minutes before); the
    peer runs at both T = --hope-seq and that length, so the ratio compares equal T.
    The ratio to the reference interpreter is measured at --hope-ref-seq tokens on both backends."""
    B, T, d, H, L = args.batch, args.hope_seq, args.d, args.heads, args.hope_layers
    Tn, Tr = args.hope_nestc_seq, args.hope_ref_seq
    tokens = torch.randint(0, 256, (B, T))

    def config(t: int) -> str:
        return f"d={d} layers={L} heads={H} CMS 16/64/256 B={B} T={t} fp32, fwd+bwd (CE)"

    def ce(logits: Tensor, tok: Tensor) -> Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten())

    nl_fb: dict[int, float] = {}
    try:
        from nested_learning.levels import LevelSpec
        from nested_learning.model import HOPEModel, ModelConfig

        for variant in ("hope_selfmod", "hope_attention"):
            torch.manual_seed(0)
            cfg = ModelConfig(
                vocab_size=257,
                dim=d,
                num_layers=L,
                heads=H,
                titan_level=LevelSpec("titan", 64),
                cms_levels=[LevelSpec("cms_fast", 16), LevelSpec("cms_mid", 64), LevelSpec("cms_slow", 256)],
                block_variant=variant,
                self_mod_chunk_size=8,
                self_mod_chunk_size_memory=64,
                self_mod_local_conv_window=4,
            )
            peer = HOPEModel(cfg)
            for t in sorted({T, Tn}, reverse=True):
                tok = tokens[:, :t]

                def peer_step(peer: Any = peer, tok: Tensor = tok) -> None:
                    ce(peer(tok), tok).backward()
                    peer.zero_grad(set_to_none=True)

                m = measure(peer_step, args.repeats)
                if variant == "hope_selfmod":
                    nl_fb[t] = m["s"]
                extra = ", self-mod chunk 8, memory chunk 64" if variant == "hope_selfmod" else ""
                rows.append(
                    {
                        "part": "hope",
                        "row": f"nested-learning HOPEModel ({variant}), fwd+bwd, T={t}",
                        "config": config(t) + extra,
                        "s": m["s"],
                        "tok_s": B * (t - 1) / m["s"],
                        "samples": m["samples"],
                        "params": sum(p.numel() for p in peer.parameters()),
                    }
                )
    except ImportError as exc:
        rows.append({"part": "hope", "row": "nested-learning HOPEModel", "error": f"not installed: {exc}"})

    for spec in ("hope", "hope_attention", "titans_mal"):
        try:
            model = nestc.compile(ROOT / "specs" / f"{spec}.nest", d=d, heads=H, layers=L)
        except nestc.SpecError as exc:
            first = str(exc).splitlines()
            message = next((line for line in first if "error[" in line), first[0] if first else repr(exc))
            rows.append(
                {"part": "hope", "row": f"nestc {spec}", "error": f"nestc: not yet runnable: {message.strip()}"}
            )
            continue
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
            rows.append({"part": "hope", "row": f"nestc {spec}", "error": f"nestc compile failed: {exc!r}"})
            continue

        def step(model: Any = model, t: int = Tn) -> None:
            tok = tokens[:, :t]
            ce(model(tok), tok).backward()
            model.zero_grad(set_to_none=True)

        model.backend = "reference"
        flops = count_flops(lambda model=model: step(model, Tr)) * Tn / Tr  # type: ignore[misc]
        mr = measure(lambda model=model: step(model, Tr), args.hope_repeats)  # type: ignore[misc]
        model.backend = "chunked"
        mcr = measure(lambda model=model: step(model, Tr), args.hope_repeats)  # type: ignore[misc]
        mc = measure(step, args.hope_repeats)
        r = {
            "part": "hope",
            "row": f"nestc {spec} chunked, fwd+bwd, T={Tn}",
            "config": config(Tn) + (" (window 64, 4 persistent tokens)" if spec == "titans_mal" else ""),
            "s": mc["s"],
            "tok_s": B * (Tn - 1) / mc["s"],
            "ref_flops": flops,
            "gflop_s": flops / mc["s"] / 1e9,
            "samples": mc["samples"],
            "x_reference": mr["s"] / mcr["s"],
            "reference_at_T": Tr,
            "reference_s": mr["s"],
            "chunked_s_at_reference_T": mcr["s"],
        }
        if Tn in nl_fb:
            r["x_nested_learning"] = nl_fb[Tn] / mc["s"]
        if "note" in mc:
            r["note"] = mc["note"]
        rows.append(r)
    notes["hope_note"] = (
        f"nestc HOPE-part rows run at T={Tn} (nested-learning at T={T} and T={Tn}; x nested_learning compares "
        f"equal T, hope_selfmod); 'vs reference' is chunked vs reference fwd+bwd both at T={Tr}; FLOPs are the "
        f"reference's fwd+bwd counted at T={Tr}, scaled x{Tn / Tr:g}"
    )


# ---------------------------------------------------------------- the compiled scan (W003)


def compiled_scan(args: argparse.Namespace, rows: list[dict[str, Any]], notes: dict[str, Any]) -> None:
    """A matrix memory with no parallel form (`momentum_gd` every token, W003): the eager per-token loop over
    the reference step against the compiled scan (``runtime/ops/compiled_scan.py``), forward+backward."""
    from nestc_runtime.ops import compiled_scan as cs
    from nestc_runtime.ops.matrix_memory import MatrixMemoryConfig, MatrixMemoryState, chunked

    B, H, T, dh = args.batch, args.heads, args.scan_seq, args.d // args.heads
    cfg = MatrixMemoryConfig("l2", "after", 1, "online", optimizer="momentum_gd")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    x = {
        "q": rand(B, H, T, dh),
        "k": F.normalize(rand(B, H, T, dh), dim=-1),
        "v": rand(B, H, T, dh),
        "lr": 0.5 * torch.sigmoid(rand(B, H, T)),
        "retain": 0.5 + 0.5 * torch.sigmoid(rand(B, H, T) + 1),
        "beta": 0.9 * torch.sigmoid(rand(B, H, T)),
        "init": 0.3 * rand(H, dh, dh),
    }
    x = {name: t.requires_grad_() for name, t in x.items()}

    def fwd_bwd(compiled: bool) -> None:
        cs.set_compiled_scan(compiled)
        state = MatrixMemoryState.initial(x["init"], B)
        o, after = chunked(x["q"], x["k"], x["v"], x["lr"], x["retain"], state, cfg, momentum=x["beta"])
        (o.square().sum() + after.S.sum()).backward()

    cs.WARMUP_STEPS = 0  # compile at the first call (a long job reaches this point after its warm-up)
    start = time.perf_counter()
    fwd_bwd(True)
    notes["compiled_scan_first_call_s"] = time.perf_counter() - start  # compiles the forward and backward
    times = {name: measure(lambda c=c: fwd_bwd(c), args.repeats) for name, c in (("eager", False), ("compiled", True))}
    cs.set_compiled_scan(True)
    config = f"B={B} H={H} T={T} d_head={dh}, matrix momentum_gd every token, fp32"
    for name, key in (("compiled scan, fwd+bwd", "compiled"), ("eager scan (per-token loop), fwd+bwd", "eager")):
        row = {"part": "compiled_scan", "row": name, "config": config, "s": times[key]["s"]}
        row.update(tok_s=B * T / times[key]["s"], samples=times[key]["samples"])
        if key == "compiled":
            row["x_eager_scan"] = times["eager"]["s"] / times["compiled"]["s"]
            row["note"] = f"first call, compiling, {notes['compiled_scan_first_call_s']:.1f} s"
        rows.append(row)


# ---------------------------------------------------------------- report


def fmt_row(r: dict[str, Any], rate: float) -> list[str]:
    if "error" in r:
        return [r["row"], "-", "-", "-", "-", "-", r["error"][:160]]
    ratios = [
        f"{k[2:]} {v:.2f}x" for k, v in r.items() if k.startswith("x_") and isinstance(v, float) and k != "x_reference"
    ]
    gf = r.get("gflop_s")
    return [
        r["row"],
        f"{r['s'] * 1e3:.1f}",
        f"{r['tok_s']:.0f}",
        f"{r['x_reference']:.2f}x" if "x_reference" in r else "-",
        f"{gf:.2f}" if gf is not None else "-",
        f"{100 * gf / rate:.1f}%" if gf is not None else "-",
        ", ".join(ratios) + (f" [{r['note']}]" if "note" in r else ""),
    ]


HEADER = ["row", "ms", "tok/s", "vs reference", "GFLOP/s", "% matmul", "other ratios (baseline time / this time)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hope-seq", type=int, default=512)
    parser.add_argument("--hope-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hope-repeats", type=int, default=3)
    parser.add_argument("--hope-nestc-seq", type=int, default=512, help="T of nestc's HOPE-part rows")
    parser.add_argument("--hope-ref-seq", type=int, default=16, help="T of the HOPE-part reference comparison")
    parser.add_argument("--flop-seq", type=int, default=64)
    parser.add_argument("--fb-seq", type=int, default=256, help="T of the Titans-memory fwd+bwd rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-seq", type=int, default=128)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--scan-seq", type=int, default=256, help="T of the compiled-scan rows")
    parser.add_argument("--parts", default="titans,hope,scan")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }
    for package in ("titans_pytorch", "nested_learning"):
        try:
            from importlib.metadata import version

            env[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001
            env[package] = None
    rate_start = matmul_gflops()
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    for part, fn in (("titans", titans_memory), ("hope", hope), ("scan", compiled_scan)):
        if part in args.parts.split(","):
            try:
                fn(args, rows, notes)
            except Exception:  # noqa: BLE001
                notes[f"{part}_failed"] = traceback.format_exc()
                print(notes[f"{part}_failed"])
            partial = args.out.with_suffix(".partial.json")  # kept until the run ends, in case it is cut off
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"env": env, "rows": rows, "notes": notes}, indent=2))
            print(f"part {part} done: {len(rows)} rows", flush=True)
    rate_end = matmul_gflops()
    rate = max(rate_start, rate_end)
    env.update(load_average_end=load_average(), matmul_gflops_start=rate_start, matmul_gflops_end=rate_end)

    table = [HEADER] + [fmt_row(r, rate) for r in rows]
    print(
        f"CPU {env['cpu']}, {args.threads} threads, fp32 matmul 1024^3: {rate_start:.0f} / {rate_end:.0f} GFLOP/s "
        f"(start / end; % matmul uses {rate:.0f}); "
        f"load average {env['load_average_start']} -> {env['load_average_end']}"
    )
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for key in ("loop_vs_reference_max_abs_diff", "chunked_vs_reference_max_abs_diff", "flops_note", "hope_note"):
        if key in notes:
            print(f"{key}: {notes[key]}")
    for key, value in notes.items():
        if key.startswith("profile_") and isinstance(value, list):
            print(f"{key}:")
            for e in value:
                print(f"  {e['op']:40} {e['calls']:6d} calls {e['self_ms']:10.1f} ms {100 * e['share']:5.1f}%")

    targets = _targets(rows, rate)
    for t in targets:
        print(f"target {t['target']}: {t['reached']} ({t['value']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    result = {"config": config, "env": env, "matmul_gflops": rate, "rows": rows, "targets": targets, "notes": notes}
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    md = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table[1:]]
    md += [
        "",
        f"fp32 matmul rate {rate:.0f} GFLOP/s ({args.threads} threads); load average "
        f"{env['load_average_start']} -> {env['load_average_end']}; torch {env['torch']}.",
        "",
    ]
    md += [f"- target {t['target']}: **{t['reached']}** ({t['value']})" for t in targets]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"written to {args.out} and {args.out.with_suffix('.md')}")


def _targets(rows: list[dict[str, Any]], rate: float) -> list[dict[str, str]]:
    by = {r["row"]: r for r in rows}
    out = []
    lvl = by.get("nestc level chunked, fwd")
    if lvl is not None:
        x = lvl["x_reference"]
        out.append(
            {
                "target": "chunked >= 20x reference (Titans LMM memory, T=1024)",
                "value": f"{x:.2f}x",
                "reached": "yes" if x >= 20 else "no",
            }
        )
        if "x_titans_pytorch" in lvl:
            x = lvl["x_titans_pytorch"]
            out.append(
                {
                    "target": ">= 50x titans-pytorch NeuralMemory forward",
                    "value": f"{x:.2f}x",
                    "reached": "yes" if x >= 50 else "no",
                }
            )
        share = lvl["gflop_s"] / rate
        out.append(
            {
                "target": "Titans memory layer >= 25% of matmul rate",
                "value": f"{100 * share:.1f}%",
                "reached": "yes" if share >= 0.25 else "no",
            }
        )
    hope_row = next((r for r in rows if r["row"].startswith("nestc hope chunked")), None)
    if hope_row is not None and "x_nested_learning" in hope_row:
        x = hope_row["x_nested_learning"]
        out.append(
            {"target": "HOPE fwd+bwd >= 1x nested-learning", "value": f"{x:.2f}x", "reached": "yes" if x >= 1 else "no"}
        )
    elif "nestc hope" in by:
        out.append(
            {
                "target": "HOPE fwd+bwd >= 1x nested-learning",
                "value": by["nestc hope"]["error"][:200],
                "reached": "not measurable",
            }
        )
    return out


if __name__ == "__main__":
    main()
