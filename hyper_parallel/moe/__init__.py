"""MoE building blocks, each defined once and built for the active framework on first use.

``GroupedExperts``, ``TokenChoiceTopKRouter``, ``TokenReorderer`` and ``MoE`` are ``torch.nn.Module`` subclasses on
torch and ``mindspore.nn.Cell`` subclasses on MindSpore. The losses are plain functions.
"""

from hyper_parallel.moe.losses import LoadBalancingLossTracker, load_balancing_loss, update_expert_bias

__all__ = ["GroupedExperts", "LoadBalancingLossTracker", "MoE", "TokenChoiceTopKRouter", "TokenReorderer",
           "load_balancing_loss", "update_expert_bias"]

_LAYERS = {"GroupedExperts": "experts", "TokenChoiceTopKRouter": "router", "TokenReorderer": "router", "MoE": "moe"}


def __getattr__(name: str):
    if name in _LAYERS:
        import importlib

        return getattr(importlib.import_module(f"hyper_parallel.moe.{_LAYERS[name]}"), name)
    raise AttributeError(name)
