"""Attention JVP benchmark (METHOD.md §6): fused SDPA forward, our fused JVP, torch.func.jvp under MATH.

Targets at B4 H16 L4096 D64 bf16 on an H100/H200: fused JVP <= 3x the fused forward's time and <= 2x its peak
memory. Measured on an H200 (torch 2.11, triton 3.6), median GPU ms / peak extra GiB:
    D64:  SDPA forward 0.572 / 0.031, fused JVP 1.58 / 0.0625 (2.77x, 2.0x), MATH JVP 55.0 / 20.5
    D128: SDPA forward 0.819 / 0.0625, fused JVP 3.31 / 0.125 (4.05x, 2.0x)
The JVP does 3x the forward's matmul FLOPs; at D128 cuDNN's forward runs at ~670 TFLOP/s, our Triton kernel
at ~500. The 2.0x memory is the output and its tangent, against the forward's output (+ logsumexp).

    python -m scm_distill.kernels.bench_attention --L 4096 --D 64
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scm_distill.attention import jvp_attention

_GIB = 2**30


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _time_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    # Median GPU time of fn: CUDA events around each call, calls issued back to back as in a training step
    # (the host runs ahead, so Python overhead shows only where it exceeds the GPU work).
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(_event(), _event()) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _peak_gib(fn: Callable[[], object]) -> float:
    # Peak memory allocated by one call of fn above what was allocated before it.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / _GIB


def _math_fits(B: int, H: int, L: int, element_size: int) -> bool:
    # MATH jvp holds several [B, H, L, L] buffers: ~20 bytes per bf16 logit (ECOSYSTEM.md); 12 x element size.
    need = 12 * element_size * B * H * L * L
    free, _ = torch.cuda.mem_get_info()
    return need < 0.9 * free


def _measure(name: str, fn: Callable[[], object], result: dict, repeats: int, warmup: int) -> None:
    try:
        result[f"{name}_ms"] = _time_ms(fn, repeats, warmup)
        result[f"{name}_peak_gib"] = _peak_gib(fn)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        result[f"{name}_ms"] = result[f"{name}_peak_gib"] = None


def bench_attention_jvp(
    B: int = 4,
    H: int = 16,
    L: int = 4096,
    D: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 20,
    warmup: int = 3,
    include_math: bool = True,
) -> dict[str, float | None]:
    """Time (median ms) and peak extra memory (GiB) of: the default fused SDPA forward, torch.func.jvp through
    SDPA routed to our fused kernel (jvp_attention("fused")), and torch.func.jvp under MATH when it fits.

    Returns a dict with `<name>_ms`, `<name>_peak_gib` for name in (sdpa_forward, fused_jvp, math_jvp) and the
    ratios `fused_jvp_time_ratio`, `fused_jvp_memory_ratio` (fused JVP / fused forward).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_attention_jvp needs a CUDA device.")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(6))
    result: dict[str, float | None] = {"B": B, "H": H, "L": L, "D": D, "dtype": str(dtype)}

    def forward():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v)

    def jvp_with(mode: str):
        def run():
            with torch.no_grad(), jvp_attention(mode):
                return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))

        return run

    _measure("sdpa_forward", forward, result, repeats, warmup)
    _measure("fused_jvp", jvp_with("fused"), result, repeats, warmup)
    if include_math and _math_fits(B, H, L, q.element_size()):
        _measure("math_jvp", jvp_with("math"), result, max(3, repeats // 4), 1)
    else:
        result["math_jvp_ms"] = result["math_jvp_peak_gib"] = None
    fwd_ms, fwd_gib = result["sdpa_forward_ms"], result["sdpa_forward_peak_gib"]
    flops = 2 * B * H * L * L * D  # one L x L x D matmul; forward has 2, the fused JVP 6 (with all tangents)
    result["sdpa_forward_tflops"] = 2 * flops / fwd_ms / 1e9 if fwd_ms else None
    result["fused_jvp_tflops"] = 6 * flops / result["fused_jvp_ms"] / 1e9 if result["fused_jvp_ms"] else None
    result["fused_jvp_time_ratio"] = result["fused_jvp_ms"] / fwd_ms if fwd_ms else None
    result["fused_jvp_memory_ratio"] = result["fused_jvp_peak_gib"] / fwd_gib if fwd_gib else None
    return result


def sweep_block_configs(
    B: int = 4,
    H: int = 16,
    L: int = 4096,
    D: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    configs: list | None = None,
    repeats: int = 10,
) -> list[tuple[str, float | None, float | None]]:
    """Median ms of the kernel alone per BlockConfig: (config, primal-only ms, primal + tangent ms).

    For tuning `_CONFIGS` on a new GPU; a config that does not fit the chip reports None.
    """
    from scm_distill.kernels import flash_attention_jvp as fa

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(6))
    out, tout = torch.empty_like(q), torch.empty_like(q)
    if configs is None:
        configs = [fa.BlockConfig(m, n, w, s) for m, n in ((128, 64), (64, 64), (128, 32))
                   for w in (4, 8) for s in (2, 3)]  # fmt: skip
    primal = _kernel_ms(fa, (q, k, v, None, None, None, None, out, None), configs, repeats)
    tangent = _kernel_ms(fa, (q, k, v, tq, tk, tv, None, out, tout), configs, repeats)
    return [(str(cfg), p, t) for cfg, p, t in zip(configs, primal, tangent, strict=True)]


def _kernel_ms(fa, launch_args: tuple, configs: list, repeats: int) -> list[float | None]:
    # Median ms of fa._launch(*launch_args) per config; None where the config does not compile for this chip.
    times = []
    for cfg in configs:

        def run(cfg=cfg):
            fa._launch(*launch_args, launch_args[0].shape[-1] ** -0.5, config=cfg)

        try:
            times.append(_time_ms(run, repeats, 2))
        except Exception:  # out of resources / compile failure: this config is not an option here
            times.append(None)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--L", type=int, default=4096)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--no-math", action="store_true", help="skip the MATH baseline")
    parser.add_argument("--sweep", action="store_true", help="time the kernel per block config instead")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.sweep:
        for row in sweep_block_configs(args.B, args.H, args.L, args.D, dtype):
            print(*row, sep="\t")
        return
    result = bench_attention_jvp(args.B, args.H, args.L, args.D, dtype, include_math=not args.no_math)
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
