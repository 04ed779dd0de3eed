"""The pair kernels on one GPU: ``Kernels.gather_pairs`` and ``Kernels.combine_pairs``, forward + backward, the
torch adapter's fused Triton kernels against the neutral references, side by side in one run.

    python benchmarks/gpu_pair_kernels.py [--shapes deepseek,qwen] [--iters 20]
    TRITON_INTERPRET=1 python benchmarks/gpu_pair_kernels.py --shapes tiny   # a smoke run on CPU

Every token keeps all ``top_k`` pairs, in expert order (as the reorderer hands them over); rows bf16, scores fp32.
Correctness first: each implementation's outputs and gradients in bf16 against the reference in fp32 on the same
values. Times are CUDA-event medians (microseconds), with the copy of the ``[N, D]`` rows as the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]
os.environ.setdefault("HYPER_PARALLEL_PLATFORM", "torch")

import torch  # noqa: E402
import gpu_common as common  # noqa: E402
from gpu_common import SHAPES, rel_err  # noqa: E402

from hyper_parallel.kernels import Kernels  # noqa: E402
from platform_adapters.torch import TorchPlatform  # noqa: E402


def timed(fn, iters: int, warmup: int) -> float:
    """Median microseconds of ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    return statistics.median(common.elapsed_us(fn) for _ in range(iters))


def step(kernels, x, rows, scores, pairs, gy, K, dtype=None):
    """gather_pairs of ``x`` and combine_pairs of ``rows``, forward + backward; (outputs and gradients)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    x, rows, scores = (cast(t).detach().requires_grad_() for t in (x, rows, scores))
    gathered = kernels.gather_pairs(x, pairs, K)
    out = kernels.combine_pairs(rows, scores, pairs, x.shape[0], K)
    torch.autograd.backward([gathered, out], [cast(gy[0]), cast(gy[1])])
    return gathered.detach(), out.detach(), x.grad, rows.grad, scores.grad


def run_shape(name: str, shape, args, dev) -> None:
    T, K, D = shape.tokens, shape.top_k, shape.dim
    g = torch.Generator(device=dev).manual_seed(0)
    ids_TK = torch.rand(T, shape.experts, generator=g, device=dev).topk(K, dim=1).indices
    pairs = ids_TK.reshape(-1).argsort(stable=True)  # expert order
    N = pairs.shape[0]
    x = torch.randn(T, D, generator=g, device=dev).bfloat16()
    rows = torch.randn(N, D, generator=g, device=dev).bfloat16()
    scores = torch.rand(N, generator=g, device=dev)
    gy = (torch.randn(N, D, generator=g, device=dev).bfloat16(), torch.randn(T, D, generator=g, device=dev).bfloat16())
    reference, fused = Kernels(TorchPlatform()), TorchPlatform().kernels
    fused.pairs_impl = "triton"
    want = step(reference, x, rows, scores, pairs, gy, K, torch.float32)
    errs = {}
    for label, kernels in (("reference", reference), ("fused", fused)):
        got = step(kernels, x, rows, scores, pairs, gy, K)
        errs[label] = max(rel_err(a, b) for a, b in zip(got, want))
    times = {}
    for _ in range(args.rounds):
        for label, kernels in (("reference", reference), ("fused", fused)):
            us = timed(lambda k=kernels: step(k, x, rows, scores, pairs, gy, K), args.iters, args.warmup)
            times[label] = min(times.get(label, us), us)
    floor = timed(lambda: rows.clone(), args.iters, args.warmup)
    print(f"{name}: T={T} K={K} D={D}, N={N} bf16 rows | worst rel err vs fp32: reference {errs['reference']:.2e}, "
          f"fused {errs['fused']:.2e}")
    print(f"  gather_pairs + combine_pairs fwd+bwd: reference {times['reference']:.0f} us, fused {times['fused']:.0f} "
          f"us ({times['reference'] / times['fused']:.2f}x); copy of the rows {floor:.0f} us", flush=True)
    assert errs["fused"] < 1e-2, errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="deepseek,qwen", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two implementations")
    args = ap.parse_args(argv)
    dev = common.DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.shapes.split(","):
        run_shape(name, SHAPES[name], args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
