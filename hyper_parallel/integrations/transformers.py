"""Hugging Face transformers 5.x MoE models on this project's expert styles, with one call.

transformers 5.x stores each MoE block's routed experts in one module per block (``Qwen3MoeExperts``,
``MixtralExperts``, ``DeepseekV3Experts``, ``OlmoeExperts``, ``Qwen2MoeExperts``, ``GptOssExperts``, ...), built by
``use_experts_implementation``, with fused ``gate_up_proj`` / ``down_proj`` weights (and biases in gpt-oss), and
called by its block as ``experts(hidden_states, top_k_index, top_k_weights)``. The style's preset layout
(:func:`~hyper_parallel.expert_parallel.layout.transformers_layout`) reads the decorator's flags, so
:func:`parallelize_experts` only has to find the modules:

>>> from hyper_parallel.integrations.transformers import parallelize_experts         # doctest: +SKIP
>>> mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))                    # doctest: +SKIP
>>> parallelize_experts(model, mesh)           # ExpertParallel() on every MoE block  # doctest: +SKIP

The block's router (``gate``), its shared experts and everything else stay as they are, computed by every rank on
its own tokens: under expert parallelism every rank feeds different tokens, so their gradients are per-rank
partial sums to be reduced over the data ranks like any replicated parameter's. The experts' own forward - the
implementation ``config._experts_implementation`` selects: ``"eager"``, ``"grouped_mm"``, ``"batched_mm"`` or one
registered in transformers' ``ExpertsInterface`` - runs unmodified on each rank's local shards.
"""

from __future__ import annotations

import logging

import torch
import transformers

from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.expert_parallel.layout import transformers_layout
from hyper_parallel.expert_parallel.styles import BaseExpertParallel, expert_style_of, expert_style_or_default

__all__ = ["experts_modules", "parallelize_experts"]

_log = logging.getLogger(__name__)


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``[(qualified name, experts module), ...]``: every transformers experts module in ``model`` (a module whose
    class was built by ``use_experts_implementation``), in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if transformers_layout(m) is not None]


def parallelize_experts(model: torch.nn.Module, device_mesh: DeviceMesh,
                        style: BaseExpertParallel | None = None) -> list[str]:
    """Apply ``style`` (default ``ExpertParallel()``) to every MoE block's experts in ``model``; return their names.

    One style object serves every block (a style keeps no per-call state).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``, or ``style`` not an expert style.
        ValueError: ``model`` has no transformers experts module; an experts module is already expert-parallel
            (by this project or by transformers' own ``tp_plan`` expert parallelism); or the style does not fit
            the mesh or the experts (its own message).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parallelize_experts: model must be a torch.nn.Module, got {type(model).__name__}")
    style = expert_style_or_default(style, "parallelize_experts")
    found = experts_modules(model)
    if not found:
        raise ValueError(f"parallelize_experts: {type(model).__name__} has no transformers experts module (a class "
                         f"built by use_experts_implementation, transformers {transformers.__version__}); for another "
                         "experts module apply a style with layout=ExpertsLayout(...)")
    for name, experts in found:
        if getattr(experts, "_is_expert_parallel", False):
            raise ValueError(f"parallelize_experts: {name} is already expert-parallel through transformers' own "
                             "tp_plan; load the model without a tp_plan / distributed_config for expert parallelism")
        if expert_style_of(experts) is not None:
            raise ValueError(f"parallelize_experts: {name} already carries an expert style")
    for _, experts in found:
        style.apply(experts, device_mesh)
    if callable(getattr(model, "save_pretrained", None)):
        # transformers would write one rank's shards as the model, or fail in safetensors on the sharded state
        # dict's storages while the other ranks return having written nothing
        object.__setattr__(model, "save_pretrained", _RefuseSavePretrained())
    _log.info("%s applied to %d experts modules of %s", type(style).__name__, len(found), type(model).__name__)
    return [name for name, _ in found]


class _RefuseSavePretrained:
    """``save_pretrained`` of a model whose experts are sharded: refused with the way to export it (a picklable
    instance attribute, so the model still pickles and deep-copies)."""

    def __call__(self, *args, **kwargs):
        raise ValueError("save_pretrained cannot save a model whose experts are sharded over ranks (each rank holds "
                         "only its experts). On every rank: hyper_parallel.checkpoint.export(path, model); then, on "
                         "rank 0, model.config.save_pretrained(path) (see the Checkpoints page, 'Export for "
                         "inference'); from_pretrained(path) then loads the whole model")
