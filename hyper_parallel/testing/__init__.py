"""Test support: a reusable multi-process world (:class:`World`) for running cases on every rank, and the shipped
platform conformance suite (:func:`run_conformance`, ``python -m hyper_parallel.testing.conformance``)."""

from hyper_parallel.testing.conformance import ConformanceReport, run_conformance
from hyper_parallel.testing.world import RankError, World, WorldTimeout

__all__ = ["ConformanceReport", "RankError", "World", "WorldTimeout", "run_conformance"]
