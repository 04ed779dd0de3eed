"""Where a step of the demo's training loop spends its time, per phase, on the active backend.

Wraps the loop's phases (``value_and_grad``: forward and backward; ``reduce_gradients``; ``clip_grads``; AdamW) and
the platform's collectives (and the dispatch's counts exchange and index build, which run inside the forward) with
wall-clock timers, runs :func:`hyper_parallel.demo.train.train` for a few steps with the demo's default model, and
prints each phase's milliseconds per step on ranks 0 and 1. Phases nest (the collectives run inside
``value_and_grad`` and ``reduce_gradients``), so the rows do not add up to the step.

    python benchmarks/demo_step_profile.py 1 40                                  # one process (set the backend
                                                                                  # with HYPER_PARALLEL_PLATFORM)
    python -m hyper_parallel.launch --nproc 4 --backend mindspore benchmarks/demo_step_profile.py 4 20
"""

from __future__ import annotations

import collections
import sys
import time

import hyper_parallel as hp
import hyper_parallel.demo.train as train_module
import hyper_parallel.expert_parallel.dispatch as dispatch_module
from hyper_parallel.demo.config import ModelConfig, RunSpec

SECONDS: dict = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def timed(owner, name: str, label: str | None = None) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``SECONDS[label]``."""
    inner, label = getattr(owner, name), label or name

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    nproc, steps = int(argv[0]), int(argv[1])
    p = hp.get_platform()
    for name in ("_all_to_all_single", "_all_gather_into_tensor", "_all_reduce", "value_and_grad"):
        timed(p, name)
    for name in ("reduce_gradients", "clip_grads"):
        timed(train_module, name)
    timed(train_module.AdamW, "step", "adamw")
    timed(dispatch_module, "build_permute_indices")
    timed(dispatch_module, "exchange_counts")
    ep = 2 if nproc > 1 else 1
    spec = RunSpec(backend=p.name, nproc=nproc, ep=ep, tp=1, dp=nproc // ep, steps=steps, model=ModelConfig())
    start = time.perf_counter()
    train_module.train(spec, emit=lambda line: None)
    total = time.perf_counter() - start
    rank = p.get_rank() if nproc > 1 else 0
    if rank in (0, 1):
        lines = [f"{p.name} rank {rank} of {nproc}: {total / steps * 1e3:.1f} ms per step over {steps} steps"]
        for label, seconds in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {label:26s} {seconds / steps * 1e3:8.2f} ms/step  {CALLS[label] / steps:5.1f} calls/step  "
                         f"{seconds / CALLS[label] * 1e3:7.2f} ms/call")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
