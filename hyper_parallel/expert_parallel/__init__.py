"""Expert parallelism: token permutation, dispatch / combine, and the EP / TP / ETP styles."""

from hyper_parallel.expert_parallel.dispatch import Dispatched, DispatchMeta, token_combine, token_dispatch
from hyper_parallel.expert_parallel.layout import ExpertsLayout, ExpertWeight, layout_of
from hyper_parallel.expert_parallel.permute import PermuteIndices, build_permute_indices, permute, unpermute
from hyper_parallel.expert_parallel.styles import (
    BaseExpertParallel,
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    expert_style_of,
    experts_layout_of,
)

__all__ = ["BaseExpertParallel", "DispatchMeta", "Dispatched", "ExpertParallel", "ExpertTensorParallel",
           "ExpertWeight", "ExpertsLayout", "PermuteIndices", "TensorParallel", "build_permute_indices",
           "expert_style_of", "experts_layout_of", "layout_of", "permute", "token_combine", "token_dispatch",
           "unpermute"]
