"""Resident memory MindSpore keeps per call of one op, in a loop that repeats the same work every step.

Plain MindSpore, no hyper_parallel: each case runs ``CALLS`` calls of one op per step (forward only, or under
``mindspore.value_and_grad``), the same shapes and values every step, and reports the resident memory (RSS) growth
between step 100 and the last step, in KB per call per step. An op whose memory is returned reads ~0 (the noise is
about 0.1 KB); a positive number is memory the process never gets back.

    python benchmarks/mindspore_op_memory.py            # every case, a fresh process each (about 15 minutes)
    python benchmarks/mindspore_op_memory.py matmul_2d  # one case

Measured on MindSpore 2.10.0 (CPU) in docs/failure_modes.md ("Memory"): reductions, 2-D matmul and top-k keep
1.4-4.7 KB per call for good, ``mint.cat`` about 0.65; ``mint.bmm``, elementwise arithmetic and (forward) indexing keep
nothing. The MindSpore adapter routes 2-D matmuls through ``mint.bmm`` and copies with ``y * 1`` for this reason.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

CALLS, STEPS = 32, 400
CASES = ("matmul_2d", "bmm", "sum", "sum_keepdim", "mean", "topk", "softmax", "broadcast_add", "elementwise",
         "index_rows", "cat_one", "times_one", "rowsum_by_bmm")


def _cases():
    import mindspore as ms
    import numpy as np
    from mindspore import mint, ops

    ones_CC = ms.Tensor(np.ones((1, 32, 32), np.float32))  # y's columns: a row sum already in y's shape

    def bmm(y, w):
        return mint.bmm(y.unsqueeze(0), w.unsqueeze(0)).squeeze(0)

    cases = {
        "matmul_2d": lambda y, w: y @ w,
        "bmm": bmm,
        "sum": lambda y, w: y * y.sum(),
        "sum_keepdim": lambda y, w: y * y.sum(-1, keepdims=True),
        "mean": lambda y, w: y * y.mean(),
        "topk": lambda y, w: y * y.topk(2)[0][:, :1],
        "softmax": lambda y, w: y.softmax(-1),
        "broadcast_add": lambda y, w: y + w[0],
        "elementwise": lambda y, w: (y * 1.01 - 0.01) / 1.0001,
        "index_rows": lambda y, w: y[ops.arange(y.shape[0] - 1, -1, -1)],
        "cat_one": lambda y, w: mint.cat([y]),
        "times_one": lambda y, w: y * 1,
        # sum_keepdim with no reduction anywhere: the row sums by a matmul with ones, in y's full shape, so that
        # neither the forward nor the product's backward reduces
        "rowsum_by_bmm": lambda y, w: y * mint.bmm(y.unsqueeze(0), ones_CC).squeeze(0),
    }
    assert tuple(cases) == CASES
    return cases


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(case: str, grad: bool) -> float:
    """KB kept per call per step by ``case``."""
    import mindspore as ms
    import numpy as np

    op = _cases()[case]
    rng = np.random.default_rng(0)
    w = ms.Parameter(ms.Tensor(rng.random((32, 32), dtype=np.float32) / 32), name="w")
    x = ms.Tensor(rng.random((128, 32), dtype=np.float32))

    def step(x):
        y = x * w[0]  # connects the chain to the parameter, so value_and_grad differentiates every call
        for _ in range(CALLS):
            y = op(y, w)
        return y.sum()

    run = ms.value_and_grad(step, None, [w]) if grad else step
    samples = {}
    for s in range(1, STEPS + 1):
        run(x)
        if s in (100, STEPS):
            gc.collect()
            samples[s] = _rss_mib()
    return (samples[STEPS] - samples[100]) * 1024 / (STEPS - 100) / CALLS


def main(argv: list[str]) -> int:
    if argv:  # one case, in this process
        for case in argv:
            fwd, grad = measure(case, False), measure(case, True)
            print(f"| {case:13s} | {fwd:8.2f} | {grad:8.2f} |", flush=True)
        return 0
    print(f"KB of resident memory kept per call per step ({CALLS} calls per step, steps 100->{STEPS})")
    print("| op            |  forward | under value_and_grad |")
    print("|:--------------|---------:|---------------------:|", flush=True)
    for case in CASES:
        subprocess.run([sys.executable, __file__, case], check=True)  # a fresh process per case
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
