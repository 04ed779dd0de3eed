"""What every GPU benchmark here shares: the problem shapes, the process's device and the measuring.

* ``Shape`` and ``SHAPES`` (DeepSeek-V3-like, Qwen3-30B-A3B-like, and ``tiny`` for a smoke run on CPU), ``BF16``;
* ``DEV``, the process's device: ONE place for it. Each script's ``main`` sets ``gpu_common.DEV`` (CPU under gloo
  for a smoke run); every reader reads it at call time through this module (``common.DEV`` after
  ``import gpu_common as common``), never a copy taken at import;
* ``sync`` and ``release`` (device synchronisation, cached blocks handed back between phases);
* measuring: ``rel_err`` (relative error in float64), ``Clock`` (CUDA-event medians per rank, gathered so a report
  takes the max over ranks), ``back_to_back`` (GPU time per call with calls queued), ``guarded`` (a timing that
  records running out of device memory), ``syncs_of`` (where a call makes device-to-host syncs), ``gb_per_s``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import traceback
import warnings

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: syncs_of names lines under it


@dataclasses.dataclass(frozen=True)
class Shape:
    dim: int
    hidden: int
    experts: int
    top_k: int
    tokens: int


SHAPES = {"deepseek": Shape(dim=7168, hidden=2048, experts=256, top_k=8, tokens=4096),
          "qwen": Shape(dim=2048, hidden=768, experts=128, top_k=8, tokens=4096),
          "tiny": Shape(dim=64, hidden=32, experts=16, top_k=4, tokens=64)}  # a smoke run of the script (CPU too)
BF16 = torch.bfloat16
DEV = torch.device("cuda")  # the process's device, set by each script's main (CPU under gloo for a smoke run)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    """Give cached blocks back between phases (outside timed regions: a fresh cudaMalloc would stall one)."""
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- measuring
def rel_err(got, want) -> float:
    """``||got - want|| / ||want||`` in float64, in slices (weights do not fit in float64 at once); NaN -> inf."""
    num = den = 0.0
    rows = max(1, (1 << 25) // max(1, want[0].numel())) if want.dim() else 1
    for g, w in zip(got.detach().reshape(want.shape).split(rows), want.detach().split(rows)):
        g, w = g.double(), w.double()
        num += float((g - w).square().sum())
        den += float(w.square().sum())
    err = (num ** 0.5) / max(den ** 0.5, 1e-300)
    return err if err == err else float("inf")


def elapsed_us(fn) -> float:
    """Microseconds of one call of ``fn``: CUDA events on a GPU (``DEV``), the wall clock elsewhere."""
    if DEV.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


class Clock:
    """CUDA-event timings of a region; per-rank medians gathered so the report can take the max over ranks."""

    def __init__(self, p):
        self.p, self.world = p, p.get_world_size()

    def time(self, fn, iters: int, warmup: int, barrier: bool = True) -> dict:
        for _ in range(warmup):
            fn()
        sync()
        samples = []
        for _ in range(iters):
            if barrier:
                self.p.barrier()
            samples.append(elapsed_us(fn))
        mine = torch.tensor([statistics.median(samples), min(samples), max(samples)], dtype=torch.float64,
                            device=DEV)
        every = self.p.all_gather_into_tensor(mine).reshape(self.world, 3)
        return {"us": float(every[:, 0].max()), "median_us_per_rank": every[:, 0].tolist(),
                "min_us_per_rank": every[:, 1].tolist(), "max_us_per_rank": every[:, 2].tolist(), "iters": iters}


def back_to_back(clock, fn, iters: int, warmup: int, calls: int = 10) -> dict:
    """GPU time per call with ``calls`` calls queued between two events: each call's host launch work hides behind
    the previous call's GPU work, so this is the kernels' own time (what a busy pipeline sees)."""
    def batch():
        for _ in range(calls):
            fn()
    out = clock.time(batch, iters, warmup)
    for key in ("median_us_per_rank", "min_us_per_rank", "max_us_per_rank"):
        out[key] = [v / calls for v in out[key]]
    out["us"] /= calls
    out["calls_per_sample"] = calls
    return out


def guarded(clock, fn, iters: int, warmup: int) -> dict:
    """``clock.time`` that records running out of device memory instead of ending the run. Every rank must agree:
    a rank that ran out stops issuing collectives, so the flag is all-reduced after each attempt."""
    try:
        out = clock.time(fn, iters, warmup)
        failed = 0.0
    except torch.OutOfMemoryError:
        out, failed = None, 1.0
    flag = clock.p.all_reduce(torch.tensor([failed], device=DEV), "max")
    if float(flag) or out is None:
        return {"us": float("nan"), "error": "out of device memory on some rank"}
    return out


def syncs_of(fn, calls: int = 3) -> list | None:
    """Where ``fn`` makes device-to-host syncs, as torch's sync debug mode reports them (the Python line of each),
    for ``calls`` consecutive calls; CUDA only."""
    if DEV.type != "cuda":
        return None
    per_call = []
    for _ in range(calls):
        torch.cuda.synchronize()
        sites = []

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):  # the calling chain, innermost last, inside this repository
                chain = [f"{os.path.relpath(f.filename, _ROOT)}:{f.lineno}" for f in traceback.extract_stack()[:-1]]
                sites.append(" < ".join(reversed([c for c in chain if not c.startswith("..")][-3:])))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_call.append(sites)
    return per_call


def gb_per_s(nbytes: float, us: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second) of ``nbytes`` moved in ``us`` microseconds."""
    return nbytes / us / 1e3

