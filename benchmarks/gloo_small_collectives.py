"""Small all-reduces and all-gathers on gloo: torch.distributed's own against the torch adapter's, side by side.

    python -m hyper_parallel.launch --nproc 2 --backend torch benchmarks/gloo_small_collectives.py
    python -m hyper_parallel.launch --nproc 4 --backend torch benchmarks/gloo_small_collectives.py

Up to 64 KB per member the adapter runs both as one ``all_to_all_single`` of the tensor repeated to every member
(``_GLOO_EXCHANGE_MAX_BYTES`` in ``platform_adapters/torch.py``); above it, gloo's own. Prints the time per call
(median of 5 repeats, slowest rank) of each and the ratio native / adapter (> 1: the adapter is faster), and checks
first that both give the same values.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HYPER_PARALLEL_PLATFORM", "torch")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hyper_parallel import get_platform  # noqa: E402

SIZES_KB = (0.0625, 8, 64, 512, 4096)


def per_call_us(p, fn, calls: int) -> float:
    """Median over 5 repeats of the time per call, the slowest rank's."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(5):
        p.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return float(p.all_reduce(torch.tensor([statistics.median(samples)], dtype=torch.float64), op="max")[0])


def main() -> int:
    p = get_platform()
    p.init_process_group()
    world, rank = p.get_world_size(), p.get_rank()
    rows = []
    for kb in SIZES_KB:
        numel = int(kb * 1024 / 4)
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        gathered = torch.empty(numel * world)

        def native_all_reduce():
            y = x.clone()
            dist.all_reduce(y)
            return y

        def native_all_gather():
            dist.all_gather_into_tensor(gathered, x)
            return gathered

        assert torch.allclose(p.all_reduce(x), native_all_reduce(), rtol=1e-6, atol=1e-6)
        assert torch.equal(p.all_gather_into_tensor(x), native_all_gather())
        calls = 100 if kb <= 64 else 10
        rows.append((kb, per_call_us(p, native_all_reduce, calls), per_call_us(p, lambda: p.all_reduce(x), calls),
                     per_call_us(p, native_all_gather, calls),
                     per_call_us(p, lambda: p.all_gather_into_tensor(x), calls)))
    if rank == 0:
        print(f"{world} processes on gloo; time per call, slowest rank (us); ratio = native / adapter")
        print("| KB per member | all_reduce native | adapter | ratio | all_gather native | adapter | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for kb, ar_n, ar_a, ag_n, ag_a in rows:
            print(f"| {kb:g} | {ar_n:.0f} | {ar_a:.0f} | {ar_n / ar_a:.2f} | {ag_n:.0f} | {ag_a:.0f} | "
                  f"{ag_n / ag_a:.2f} |")
    p.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
