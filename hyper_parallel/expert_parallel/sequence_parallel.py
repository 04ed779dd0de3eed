"""ReordererSequenceParallel: split the routed tokens over the ranks of a ``tp`` mesh.

When the expert-parallel group borrows the tensor-parallel ranks (tokens replicated over ``tp``), every ``tp`` rank
would route and compute the same tokens. This style makes each one take a contiguous slice of the tokens
(``torch.chunk`` sizes, so any token count works: torchtitan's version requires divisibility) before the
reorderer, and passes the slice's start as the reorderer's ``token_offset`` so the pair indices it returns point at
global token positions (no state kept between calls). The MoE layer then sums its routed
output over ``tp`` (each token's output lives on one rank) and marks the input's gradient as partial.
"""

from __future__ import annotations

from hyper_parallel.dtensor.device_mesh import DeviceMesh
from hyper_parallel.dtensor.module import distribute_module
from hyper_parallel.dtensor.placement import chunk_offsets, chunk_sizes
from hyper_parallel.parallel.style import ParallelStyle

__all__ = ["ReordererSequenceParallel"]

_SP_ATTR = "_hyper_parallel_sequence_parallel"


def _no_parameters(name, module, device_mesh) -> None:
    """The reorderer has no parameters to distribute."""


class ReordererSequenceParallel(ParallelStyle):
    """Apply to a :class:`~hyper_parallel.moe.router.TokenReorderer` with a 1-D mesh (the ``tp`` axis)."""

    def apply(self, module, device_mesh: DeviceMesh):
        if not hasattr(module, "top_k"):
            raise TypeError(f"ReordererSequenceParallel applies to a token reorderer (with a top_k attribute), got "
                            f"{type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"ReordererSequenceParallel needs a 1-D mesh (slice it: mesh['tp']), got {device_mesh}")
        distribute_module(module, device_mesh, _no_parameters, self._split_tokens)
        object.__setattr__(module, _SP_ATTR, device_mesh)
        return module

    @staticmethod
    def _my_slice(num_tokens: int, mesh: DeviceMesh) -> tuple[int, int]:
        n, k = mesh.size(), mesh.get_local_rank()
        return chunk_offsets(num_tokens, n)[k], chunk_sizes(num_tokens, n)[k]

    def _split_tokens(self, module, inputs, mesh):
        top_scores_TK, selected_TK = inputs[:2]
        start, size = self._my_slice(top_scores_TK.shape[0], mesh)
        # The reorderer's token_offset shifts its pair indices back to global token positions.
        return top_scores_TK[start:start + size], selected_TK[start:start + size], start
