"""Test support: a reusable multi-process world (:class:`World`) for running cases on every rank."""

from hyper_parallel.testing.world import RankError, World, WorldTimeout

__all__ = ["RankError", "World", "WorldTimeout"]
