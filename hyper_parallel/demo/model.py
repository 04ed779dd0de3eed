"""The demo's model: a residual stack of :class:`~hyper_parallel.moe.MoE` layers, ``h = h + moe_l(h)``.

Written the way this package writes its own layers, and the way a user can write a model once for both frameworks:
the computation in a neutral mixin (:class:`DemoModelMixin`), one small class per framework that adds the module
base (``hyper_parallel/demo/_model_torch.py``, ``_model_mindspore.py``), and :func:`build_model` choosing by the
active platform.
"""

from __future__ import annotations

import importlib

from hyper_parallel.moe._layers import framework_layers

__all__ = ["DemoModelMixin", "build_model", "routing_margin"]


class DemoModelMixin:
    """``cfg.layers`` MoE layers on a residual stream (with shared experts and the aux-loss-free expert bias)."""

    def __init__(self, cfg):
        super().__init__()
        moe = framework_layers()
        self.num_layers = cfg.layers
        for i in range(cfg.layers):
            setattr(self, f"layer{i}", moe.MoE(
                dim=cfg.dim, hidden_dim=cfg.hidden, num_experts=cfg.experts, top_k=cfg.top_k,
                num_shared_experts=cfg.shared_experts, use_expert_bias=True, init_std=cfg.init_std,
                seed=cfg.seed * 1000 + 10 * i))
        self.layer_inputs = []  # filled by forward while record_layer_inputs is set (the demo's routing margin)
        self.record_layer_inputs = False

    def moe_layers(self) -> list:
        return [getattr(self, f"layer{i}") for i in range(self.num_layers)]

    def forward(self, x):
        self.layer_inputs.clear()
        for layer in self.moe_layers():
            if self.record_layer_inputs:
                self.layer_inputs.append(x)
            x = x + layer(x)
        return x


def routing_margin(layer, x_TD):
    """Smallest gap, over the tokens ``x_TD``, between the k-th and the (k+1)-th expert the layer's router ranks
    (what its top-k decides on): how close this step came to routing a token differently."""
    top_TK = layer.router.choices(x_TD, layer.expert_bias)[1].topk(layer.top_k + 1)[0]
    return (top_TK[:, layer.top_k - 1] - top_TK[:, layer.top_k]).min().reshape(1)


def build_model(cfg):
    """The demo model for the active platform's framework."""
    framework = framework_layers().__name__.rsplit(".", 1)[-1]  # "torch" or "mindspore"
    return importlib.import_module(f"hyper_parallel.demo._model_{framework}").DemoModel(cfg)
