"""The MoE layers as ``mindspore.nn.Cell`` classes.

Each class is its framework-neutral mixin plus :class:`Cell`, a ``mindspore.nn.Cell`` whose ``construct`` (the
name MindSpore calls) runs the mixin's ``forward``; the computation is shared with :mod:`hyper_parallel.moe.torch`.
``hyper_parallel.moe.MoE`` (and the other names) resolve here when the active platform is MindSpore.

>>> from hyper_parallel.moe.mindspore import MoE
>>> layer = MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)          # doctest: +SKIP
"""

from __future__ import annotations

import mindspore

from hyper_parallel.moe.experts import GroupedExpertsMixin
from hyper_parallel.moe.moe import MoEMixin
from hyper_parallel.moe.router import TokenChoiceTopKRouterMixin, TokenReordererMixin

__all__ = ["Cell", "GroupedExperts", "MoE", "TokenChoiceTopKRouter", "TokenReorderer"]


class Cell(mindspore.nn.Cell):
    """A Cell written torch-style: ``construct`` calls ``forward``, so a subclass overrides ``forward`` only."""

    def construct(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class GroupedExperts(GroupedExpertsMixin, Cell):
    __doc__ = GroupedExpertsMixin.__doc__


class TokenChoiceTopKRouter(TokenChoiceTopKRouterMixin, Cell):
    __doc__ = TokenChoiceTopKRouterMixin.__doc__


class TokenReorderer(TokenReordererMixin, Cell):
    __doc__ = TokenReordererMixin.__doc__


class MoE(MoEMixin, Cell):
    __doc__ = MoEMixin.__doc__
    router_class = TokenChoiceTopKRouter
    reorderer_class = TokenReorderer
    experts_class = GroupedExperts
