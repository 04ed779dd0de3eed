"""The permute step on one GPU: the torch adapter's Triton block copy (``Kernels.permute_rows``) over its launch
configurations, and the step as dispatch runs it (``build_permute_indices`` + ``permute``), against the copy floor.

    python benchmarks/gpu_permute_rows.py [--shapes deepseek,qwen] [--ranks 2]
    TRITON_INTERPRET=1 python benchmarks/gpu_permute_rows.py --shapes tiny    # a smoke run on CPU

The rows a rank receives from ``--ranks`` ranks (``tokens * top_k`` bf16 rows spread over the ranks' local experts
by a seeded multinomial draw) are moved rank-major -> expert-major and back; one GPU is enough, the permute step is
local. Correctness first: every configuration's output equals the neutral reference's bit for bit. Times: GPU time
per call with 20 calls queued (the kernels' own time), median of 7; and the host time per call of the step as
dispatch runs it, which bounds it when its kernel is short.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]
os.environ.setdefault("HYPER_PARALLEL_PLATFORM", "torch")

import torch  # noqa: E402
from gpu_common import SHAPES  # noqa: E402

from hyper_parallel.expert_parallel.permute import build_permute_indices, permute, unpermute  # noqa: E402
from hyper_parallel.kernels import Kernels  # noqa: E402
from platform_adapters import _torch_cuda as cuda_kernels  # noqa: E402
from platform_adapters.torch import TorchPlatform  # noqa: E402

#: (programs per (rank, expert) block, columns per step, warps) swept
CONFIGS = tuple(itertools.product((8, 16, 32, 64), (512, 1024, 2048), (4, 8)))


def queued(fn, dev, reps: int = 7, calls: int = 20) -> tuple[float, float]:
    """(GPU us per call with ``calls`` queued, host us per call), medians of ``reps`` (one call on CPU: the smoke
    run only checks that everything runs)."""
    if dev.type != "cuda":
        reps, calls = 1, 1
    for _ in range(3 if dev.type == "cuda" else 0):
        fn()
    gpu, host = [], []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - t0) / calls * 1e6)
        if dev.type == "cuda":
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / calls * 1e3)
        else:
            gpu.append(host[-1])
    return sorted(gpu)[reps // 2], sorted(host)[reps // 2]


def run_shape(name: str, ranks: int, dev) -> None:
    shape = SHAPES[name]
    R, E, T, D = ranks, shape.experts // ranks, shape.tokens * shape.top_k, shape.dim
    g = torch.Generator().manual_seed(0)
    host = torch.multinomial(torch.ones(R * E), T, replacement=True, generator=g).bincount(minlength=R * E)
    counts = host.to(dev)
    x = torch.randn(T, D, generator=g).to(dev, torch.bfloat16)
    per_expert = counts.reshape(R, E).sum(0)
    offsets = (per_expert.cumsum(0) - per_expert).contiguous()
    args = (counts, R, E, offsets, T, T)
    reference = Kernels(TorchPlatform())
    want = reference.permute_rows(x, *args, True)
    assert torch.equal(reference.permute_rows(want, *args, False), x)
    y = torch.empty_like(x)
    copy, _ = queued(lambda: y.copy_(x), dev)
    print(f"{name}: {T} rows x {D} bf16 from {R} ranks x {E} local experts; copy floor {copy:.0f} us", flush=True)
    print("  config (programs/block, columns, warps): to expert-major, back (x the copy floor)", flush=True)
    default = cuda_kernels.PERMUTE_ROWS_CONFIG
    try:
        for config in CONFIGS if dev.type == "cuda" else (default,):
            cuda_kernels.PERMUTE_ROWS_CONFIG = config
            got = cuda_kernels.permute_rows_triton(x, *args, True)
            assert torch.equal(got, want) and torch.equal(cuda_kernels.permute_rows_triton(got, *args, False), x)
            there, _ = queued(lambda: cuda_kernels.permute_rows_triton(x, *args, True), dev)
            back, _ = queued(lambda: cuda_kernels.permute_rows_triton(want, *args, False), dev)
            mark = "  <- the package's" if config == default else ""
            print(f"  {config}: {there / copy:.3f}x, {back / copy:.3f}x{mark}", flush=True)
    finally:
        cuda_kernels.PERMUTE_ROWS_CONFIG = default
    host_counts = host.tolist()
    idx = build_permute_indices(counts, host_counts, R, E)
    assert idx.fused and torch.equal(permute(x, idx), want)
    step, step_host = queued(lambda: permute(x, build_permute_indices(counts, host_counts, R, E)), dev)
    back, back_host = queued(lambda: unpermute(want, idx), dev)
    _, build_host = queued(lambda: build_permute_indices(counts, host_counts, R, E), dev)
    print(f"  as dispatch runs it: build + permute {step / copy:.3f}x the copy floor (host {step_host:.0f} us per "
          f"call, the build alone {build_host:.0f} us); unpermute {back / copy:.3f}x (host {back_host:.0f} us)",
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="deepseek,qwen")
    ap.add_argument("--ranks", type=int, default=2, help="ranks the rows come from (default 2)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: run with TRITON_INTERPRET=1 for a smoke run on CPU", file=sys.stderr)
        return 2
    if dev.type == "cpu":  # the interpreter runs the kernel on CPU tensors
        from hyper_parallel import get_platform

        get_platform().kernels.permute_rows_impl = "triton"
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU (Triton interpreter)'}; torch "
          f"{torch.__version__}", flush=True)
    for name in args.shapes.split(","):
        run_shape(name, args.ranks, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
