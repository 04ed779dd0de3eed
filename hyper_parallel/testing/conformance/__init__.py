"""The platform conformance suite, shipped with the package so any adapter can run it.

Run it against a backend, built-in or registered under the entry-point group ``hyper_parallel.platforms``::

    python -m hyper_parallel.testing.conformance --backend NAME [--nproc 2 4] [--timeout S]

or from Python with :func:`run_conformance`. The cases live in :mod:`.collectives`, :mod:`.local` and
:mod:`.errors` and are listed, with the world sizes they run at, by :func:`.suite.conformance_cases`. They are
framework-neutral: they reach the backend only through :func:`~hyper_parallel.get_platform` and the contract.

Importing this package imports no framework and no numpy (the cases are imported when a run starts).
"""

from hyper_parallel.testing.conformance.runner import CaseResult, ConformanceReport, main, run_conformance

__all__ = ["CaseResult", "ConformanceReport", "main", "run_conformance"]
