"""Expert styles on experts modules of other layouts (written once, built on every framework): fused, transposed
and biased weights described by an ``ExpertsLayout``, against the same module unsharded on one device."""

from __future__ import annotations

import numpy as np

from hyper_parallel import (
    ExpertParallel,
    ExpertsLayout,
    ExpertTensorParallel,
    ExpertWeight,
    TensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    moe,
)
from hyper_parallel.expert_parallel import experts_layout_of
from hyper_parallel.expert_parallel.styles import host_counts
from hyper_parallel.testing.conformance.errors import raises as _raises
from tests.cases.dtensor_cases import _host, _t, np_local
from tests.cases.ep_cases import D, G, assert_rel, routed_inputs

H = 4  # each expert's hidden dim (the fused weight holds 2H)


class FusedExpertsMixin:
    """SwiGLU experts stored the way many third-party models store them: ``gate_up [E, D, 2H]`` (transposed, gate
    and up fused along the hidden dim, as concatenated halves or interleaved), ``down [E, H, D]`` and an output bias
    ``down_bias [E, D]``; called grouped, ``experts(rows, num_tokens_per_expert)``."""

    def __init__(self, fused: str, seed: int = 0):
        super().__init__()
        p = get_platform()
        rng = np.random.RandomState(seed)
        self.fused = fused
        self.gate_up = p.Parameter(_t(rng.randn(G, D, 2 * H) * 0.5))
        self.down = p.Parameter(_t(rng.randn(G, H, D) * 0.5))
        self.down_bias = p.Parameter(_t(rng.randn(G, D)))

    def forward(self, rows, num_tokens_per_expert):
        p = get_platform()
        outs, start = [], 0
        for e, n in enumerate(host_counts(num_tokens_per_expert)):
            if n == 0:
                continue  # (zero-size slices have no gradient kernel on MindSpore CPU)
            h = rows[start:start + n] @ self.gate_up[e]
            half = h.shape[-1] // 2
            gate, up = (h[:, :half], h[:, half:]) if self.fused == "concat" else (h[:, 0::2], h[:, 1::2])
            outs.append((gate * gate.sigmoid() * up) @ self.down[e] + self.down_bias[e])
            start += n
        return p.cat(outs) if len(outs) > 1 else outs[0] if outs else rows * 0


def fused_layout(fused: str) -> ExpertsLayout:
    return ExpertsLayout(weights=(ExpertWeight("gate_up", hidden_dim=2, fused=fused),
                                  ExpertWeight("down", hidden_dim=1), ExpertWeight("down_bias", output_bias=True)))


def _fused_experts(fused: str):
    base = moe.GroupedExperts.__bases__[1]  # the framework's module base (a Cell calling forward on MindSpore)
    return type("FusedExperts", (FusedExpertsMixin, base), {})(fused)


def _mesh_and_style(style: str, layout):
    p = get_platform()
    world = p.get_world_size()
    if style == "ep":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), ExpertParallel(layout=layout), \
            p.get_rank(), world
    if style == "tp":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), TensorParallel(layout=layout), 0, 1
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    return mesh, ExpertTensorParallel(layout=layout), mesh.get_local_rank("ep"), 2


def fused_experts_match_single_device(style: str, fused: str, pattern: str = "random") -> bool:
    """Output, input gradient and every parameter's gradient (shards of the summed single-device gradient)."""
    p = get_platform()
    layout = fused_layout(fused)
    mesh, style_obj, data_id, num_data = _mesh_and_style(style, layout)
    ref = _fused_experts(fused)
    ref_params = [q for _, q in p.named_parameters(ref)]
    ref_out = ref_gx = None
    ref_grads = [0.0] * len(ref_params)
    for i in range(num_data):
        x_np, counts = routed_inputs(i, pattern, num_data)
        w = _t(np.random.RandomState(500 + i).randn(len(x_np), D))
        _, (gx,), grads = p.value_and_grad(lambda t, c=tuple(counts), w=w: (ref(t, c) * w).sum(), [_t(x_np)],
                                           ref_params)
        ref_grads = [a + _host(g) for a, g in zip(ref_grads, grads)]
        if i == data_id:
            ref_out, ref_gx = _host(ref(_t(x_np), tuple(counts))), _host(gx)

    experts = _fused_experts(fused)
    style_obj.apply(experts, mesh)
    assert experts_layout_of(experts) is layout
    x_np, counts = routed_inputs(data_id, pattern, num_data)
    counts_t = p.tensor(counts, dtype="int64")
    w = _t(np.random.RandomState(500 + data_id).randn(len(x_np), D))
    params = [q for _, q in p.named_parameters(experts)]
    out = experts(_t(x_np), counts_t)
    _, (gx,), grads = p.value_and_grad(lambda t: (experts(t, counts_t) * w).sum(), [_t(x_np)], params)
    what = f"{style} {fused} {pattern} rank {p.get_rank()}"
    if len(x_np):
        assert_rel(_host(out), ref_out, what + " output")
        assert_rel(_host(gx), ref_gx, what + " input grad")
    for (name, q), g, want in zip(p.named_parameters(experts), grads, ref_grads):
        spec = get_parameter_spec(q)
        assert_rel(_host(g), np_local(want, spec.device_mesh, spec.placements), f"{what} grad of {name}")
    return True


def grouped_experts_take_an_explicit_layout() -> bool:
    """This project's GroupedExperts with its layout spelled out equal the preset (bit for bit)."""
    p = get_platform()
    world = p.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    layout = ExpertsLayout(weights=(ExpertWeight("w1", hidden_dim=1), ExpertWeight("w2", hidden_dim=2),
                                    ExpertWeight("w3", hidden_dim=1)))
    a, b = (moe.GroupedExperts(dim=D, hidden_dim=H, num_experts=G, init_std=0.5, seed=0) for _ in range(2))
    ExpertParallel(layout=layout).apply(a, mesh)
    ExpertParallel().apply(b, mesh)
    x_np, counts = routed_inputs(p.get_rank(), "random", world)
    counts_t = p.tensor(counts, dtype="int64")
    np.testing.assert_array_equal(_host(a(_t(x_np), counts_t)), _host(b(_t(x_np), counts_t)))
    return True


def bad_layouts() -> bool:
    """Every refusal names the constraint, and leaves the module as it was."""
    p = get_platform()
    world = p.get_world_size()
    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    experts = _fused_experts("concat")
    before = [(n, tuple(q.shape)) for n, q in p.named_parameters(experts)]
    _raises(TypeError, r"FusedExperts is not a recognised experts module .* Its parameters: gate_up \[8, 6, 8\] "
            r"float32, down \[8, 4, 6\] float32, down_bias \[8, 6\] float32\. Describe them with "
            r"ExpertParallel\(layout=ExpertsLayout", ExpertParallel().apply, experts, ep)
    half = ExpertsLayout(weights=(ExpertWeight("gate_up", hidden_dim=2, fused="concat"),
                                  ExpertWeight("down", hidden_dim=1)))
    _raises(TypeError, r"does not fit its experts layout: the layout does not describe \['down_bias'\]",
            ExpertParallel(layout=half).apply, experts, ep)
    wrong_dim = ExpertsLayout(weights=(ExpertWeight("gate_up", hidden_dim=1, fused="concat"),
                                       ExpertWeight("down", hidden_dim=1), ExpertWeight("down_bias", output_bias=True)))
    _raises(TypeError, r"the hidden dims disagree \(\[3, 4\]\)", ExpertParallel(layout=wrong_dim).apply, experts, ep)
    no_bias_role = ExpertsLayout(weights=(ExpertWeight("gate_up", hidden_dim=2, fused="concat"),
                                          ExpertWeight("down", hidden_dim=1), ExpertWeight("down_bias")))
    _raises(TypeError, r"\['down_bias'\] of FusedExperts have no hidden dim and are not an output bias",
            TensorParallel(layout=no_bias_role).apply, experts, ep)
    assert [(n, tuple(q.shape)) for n, q in p.named_parameters(experts)] == before
    assert experts_layout_of(experts) is None
    _raises(TypeError, r"layout must be an ExpertsLayout or None, got dict", ExpertParallel, layout={})
    _raises(ValueError, r"fused must be one of \[None, 'concat', 'interleave'\], got 'halves'", ExpertWeight, "w",
            hidden_dim=1, fused="halves")
    _raises(ValueError, r"an output_bias follows the model dim, so hidden_dim must be None, got 1", ExpertWeight,
            "b", hidden_dim=1, output_bias=True)
    _raises(ValueError, r"call must be one of \['grouped', 'top_k'\], got 'dense'", ExpertsLayout,
            weights=(ExpertWeight("w", hidden_dim=1),), call="dense")
    _raises(ValueError, r"each weight is named once", ExpertsLayout,
            weights=(ExpertWeight("w", hidden_dim=1), ExpertWeight("w", hidden_dim=2)))
    # wrong call arity after apply: a clear error, not an unpacking failure
    ExpertParallel(layout=fused_layout("concat")).apply(experts, ep)
    _raises(ValueError, r"is called grouped, as experts\(routed_input, num_tokens_per_expert\); got 3 positional",
            experts, _t(np.ones((2, D))), p.tensor([2] + [0] * (G - 1), dtype="int64"), None)
    return True
