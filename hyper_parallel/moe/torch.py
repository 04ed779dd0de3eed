"""The MoE layers as ``torch.nn.Module`` classes.

Each class is its framework-neutral mixin plus ``torch.nn.Module``; the computation is the mixin's, shared with
:mod:`hyper_parallel.moe.mindspore`. ``hyper_parallel.moe.MoE`` (and the other names) resolve here when the active
platform is torch-based (``torch``, ``torch_npu``).

>>> from hyper_parallel.moe.torch import MoE
>>> layer = MoE(dim=64, hidden_dim=128, num_experts=8, top_k=2)          # doctest: +SKIP
"""

from __future__ import annotations

import torch

from hyper_parallel.moe.experts import GroupedExpertsMixin
from hyper_parallel.moe.moe import MoEMixin
from hyper_parallel.moe.router import TokenChoiceTopKRouterMixin, TokenReordererMixin

__all__ = ["GroupedExperts", "MoE", "TokenChoiceTopKRouter", "TokenReorderer"]


class GroupedExperts(GroupedExpertsMixin, torch.nn.Module):
    __doc__ = GroupedExpertsMixin.__doc__


class TokenChoiceTopKRouter(TokenChoiceTopKRouterMixin, torch.nn.Module):
    __doc__ = TokenChoiceTopKRouterMixin.__doc__


class TokenReorderer(TokenReordererMixin, torch.nn.Module):
    __doc__ = TokenReordererMixin.__doc__


class MoE(MoEMixin, torch.nn.Module):
    __doc__ = MoEMixin.__doc__
    router_class = TokenChoiceTopKRouter
    reorderer_class = TokenReorderer
    experts_class = GroupedExperts
