"""MoE building blocks, written once and declared for each framework.

``GroupedExperts``, ``TokenChoiceTopKRouter``, ``TokenReorderer`` and ``MoE`` are the active platform's classes:
``torch.nn.Module`` subclasses from :mod:`hyper_parallel.moe.torch` on torch, ``mindspore.nn.Cell`` subclasses
from :mod:`hyper_parallel.moe.mindspore` on MindSpore (resolved on first access; importing this package imports no
framework). Their logic lives once in the mixins (:class:`~hyper_parallel.moe.moe.MoEMixin` ...). The losses are
plain functions.
"""

from hyper_parallel.moe.losses import LoadBalancingLossTracker, load_balancing_loss, update_expert_bias
from hyper_parallel.moe.moe import RoutingStats

__all__ = ["GroupedExperts", "LoadBalancingLossTracker", "MoE", "RoutingStats", "TokenChoiceTopKRouter",
           "TokenReorderer", "load_balancing_loss", "update_expert_bias"]

_LAYERS = ("GroupedExperts", "MoE", "TokenChoiceTopKRouter", "TokenReorderer")


def __getattr__(name: str):
    if name in _LAYERS:
        from hyper_parallel.moe._layers import framework_layers

        return getattr(framework_layers(), name)
    raise AttributeError(f"module 'hyper_parallel.moe' has no attribute {name!r}")
