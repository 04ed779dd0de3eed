"""``hyper-parallel demo``: a small seeded MoE model trained on N local processes, checked against one process.

* :mod:`~hyper_parallel.demo.driver` — the command: options, checks, launching the runs, the verdict;
* :mod:`~hyper_parallel.demo.config` — options -> ``ep x tp`` layout, and every input check (no framework import);
* :mod:`~hyper_parallel.demo.task` — the synthetic task: regress a fixed random teacher MoE (NumPy, seeded);
* :mod:`~hyper_parallel.demo.train` — what each rank runs (framework-neutral, on the platform contract);
* :mod:`~hyper_parallel.demo.report` — progress bar, summary table, JSON and PNG.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hyper-parallel demo`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    from hyper_parallel.demo.driver import main as _main

    return _main(argv)
