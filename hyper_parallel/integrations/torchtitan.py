"""torchtitan 0.3.0 MoE models on this project's expert styles, with one call and torchtitan's forward unchanged.

A torchtitan ``MoE`` routes its tokens in ``RoutedExperts``: ``token_dispatcher.dispatch`` groups the (token, expert)
pairs by global expert, ``inner_experts`` (a ``GroupedExperts`` with ``w1_EFD``, ``w2_EDF``, ``w3_EFD``) computes
them, ``token_dispatcher.combine`` weights and sums them back. With torchtitan's ``LocalTokenDispatcher`` (its
dispatcher without expert parallelism) the experts receive exactly what this project's styles take: rows grouped by
global expert and the per-expert counts. :func:`parallelize_moe` applies a style to every ``inner_experts``; the
style's hooks exchange the rows between ranks around the unchanged ``GroupedExperts.forward``, which then runs on the
local shards with the local counts (an int tensor, as torchtitan expects):

>>> from hyper_parallel.integrations.torchtitan import parallelize_moe            # doctest: +SKIP
>>> parallelize_moe(model, init_device_mesh("cpu", (4,), mesh_dim_names=("ep",)))  # doctest: +SKIP

``ExpertParallel().apply(moe.routed_experts.inner_experts, mesh)`` does the same for one layer.
"""

from __future__ import annotations

import logging

import torch
from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
from torchtitan.models.common.token_dispatcher import BaseEPTokenDispatcher, LocalTokenDispatcher

from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.expert_parallel.styles import BaseExpertParallel, expert_style_of, expert_style_or_default

__all__ = ["parallelize_moe"]

_log = logging.getLogger(__name__)


def parallelize_moe(model: torch.nn.Module, device_mesh: DeviceMesh,
                    style: BaseExpertParallel | None = None) -> list[str]:
    """Apply ``style`` (default ``ExpertParallel()``) to the ``GroupedExperts`` of every torchtitan ``MoE`` in
    ``model`` (``model`` may be one ``MoE``); return the experts' qualified names.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``style`` not an expert style.
        ValueError: ``model`` has no torchtitan ``RoutedExperts``; a layer's dispatcher already does expert
            parallelism (torchtitan's own ``AllToAllTokenDispatcher`` / DeepEP: the tokens would be exchanged
            twice) or its experts already carry a style; or the style does not fit (its own message).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize_moe: model must be a torch.nn.Module, got {type(model).__name__}")
    style = expert_style_or_default(style, "parallelize_moe")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    if not found:
        raise ValueError(f"parallelize_moe: {type(model).__name__} contains no torchtitan MoE (RoutedExperts)")
    for name, routed in found:
        dispatcher = routed.token_dispatcher
        if isinstance(dispatcher, BaseEPTokenDispatcher) or not isinstance(dispatcher, LocalTokenDispatcher):
            raise ValueError(f"parallelize_moe: {name}.token_dispatcher is {type(dispatcher).__name__}, which does "
                             "its own token exchange; build the model with torchtitan's LocalTokenDispatcher (no "
                             "expert parallelism in torchtitan) so this project's style does it")
        if not isinstance(routed.inner_experts, GroupedExperts):
            raise ValueError(f"parallelize_moe: {name}.inner_experts is {type(routed.inner_experts).__name__}, not "
                             "torchtitan's GroupedExperts; apply a style with layout=ExpertsLayout(...) to it")
        if expert_style_of(routed.inner_experts) is not None:
            raise ValueError(f"parallelize_moe: {name}.inner_experts already carries an expert style")
    names = []
    for name, routed in found:
        style.apply(routed.inner_experts, device_mesh)
        names.append(f"{name}.inner_experts" if name else "inner_experts")
    _log.info("%s applied to %d torchtitan MoE layers", type(style).__name__, len(names))
    return names
