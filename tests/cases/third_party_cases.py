"""Third-party MoE models (Hugging Face transformers 5.x, torchtitan 0.3.0) on this project's expert styles, run on
every rank against the same model left whole on one process and fed every data rank's tokens (torch only: both
libraries are torch modules).

Each data rank feeds different tokens: every rank under ``ExpertParallel``, each ``ep`` line under
``ExpertTensorParallel`` (the ranks of a ``tp`` line feed the same ones), one copy under ``TensorParallel``. Checked:
the output and the input gradient (this rank's slice of the reference's), every expert-shard gradient (this rank's
piece, under the parameter's recorded spec, of the reference's full gradient, which sums every data rank's rows, as
the shard does) and every replicated gradient (router, shared experts: summed over the data ranks, as data
parallelism would, it equals the reference's). transformers runs in float32 (relative error 1e-5); torchtitan's
``GroupedExperts`` computes in bfloat16, so its reference sees all ranks' tokens in one batch in rank order (each
expert then sums its rows in the order the ranks deliver them) and the results are (near-)exact.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
)
from hyper_parallel.testing.conformance.errors import raises as _raises
from tests import third_party as tp
from tests.cases.dtensor_cases import np_local

TOL = 1e-5  # float32, summation orders differ
EXACT = 1e-6  # torchtitan's bfloat16 experts fed each expert's rows in the reference's order: (near-)exact
B, L, DIM, HIDDEN = 2, 8, 32, 16  # each data rank's batch and sequence; tp.build_*'s defaults (model, expert hidden)
FAMILIES = tuple(sorted(tp.FAMILIES))
IMPLS = tp.EXPERTS_IMPLEMENTATIONS  # eager, grouped_mm, batched_mm (the CPU ones)


@dataclasses.dataclass
class _Setup:
    mesh: object  # the mesh the style is applied on
    style: object
    data_id: int  # which data rank's tokens this rank feeds
    num_data: int
    data_group: object  # the group to sum replicated gradients over (None: one data rank)


def _setup(style: str) -> _Setup:
    p = get_platform()
    world = p.get_world_size()
    if style == "ep":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        return _Setup(mesh, ExpertParallel(), p.get_rank(), world, mesh.get_group())
    if style == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        return _Setup(mesh, TensorParallel(), 0, 1, None)
    assert style == "etp", style
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    return _Setup(mesh, ExpertTensorParallel(), mesh.get_local_rank("ep"), 2, mesh.get_group("ep"))


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float64)


def rel(got, want, what: str, tol: float = TOL) -> float:
    """``||got - want|| / ||want||`` (``||got - want||`` where ``want`` is all zeros), asserted ``<= tol``."""
    got, want = _np(got), _np(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = np.linalg.norm(want)
    err = float(np.linalg.norm(got - want) / (scale if scale > 0 else 1.0))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e} (rank {get_platform().get_rank()})"
    return err


def grad_of(t):
    """``t.grad``; zeros for a tensor with no elements that got none (nothing to carry a gradient: an empty batch)."""
    if t.grad is None and t.numel() == 0:
        import torch

        return torch.zeros_like(t)
    assert t.grad is not None, f"a tensor of shape {tuple(t.shape)} got no gradient (rank {get_platform().get_rank()})"
    return t.grad


def _first(out):
    return out[0] if isinstance(out, tuple) else out  # gpt-oss's GptOssMLP returns (output, router_scores)


def grad_errors(model, ref, s: _Setup, experts: list[str], what: str, tol: float = TOL,
                expert_tol: float | None = None) -> dict:
    """Max relative error of the expert-shard gradients (``experts``: the qualified names of the parallelized
    experts modules, ``""`` for ``model`` itself) and of the replicated ones (summed over the data ranks)."""
    p = get_platform()
    ref_params = dict(ref.named_parameters())
    errs = {"expert_grads": 0.0, "replicated_grads": 0.0}
    for name, q in model.named_parameters():
        want = ref_params[name].grad
        assert q.grad is not None, f"{what}: {name} has no gradient"
        spec = get_parameter_spec(q)
        if any(e == "" or name.startswith(e + ".") for e in experts):
            assert spec is not None, f"{what}: expert weight {name} was not distributed"
            err = rel(q.grad, np_local(_np(want), spec.device_mesh, spec.placements), f"{what} grad of {name}",
                      tol if expert_tol is None else expert_tol)
            errs["expert_grads"] = max(errs["expert_grads"], err)
        else:
            assert spec is None, f"{what}: {name} is not an expert weight but carries {spec}"
            g = q.grad if s.data_group is None else p.all_reduce(q.grad, group=s.data_group)
            errs["replicated_grads"] = max(errs["replicated_grads"], rel(g, want, f"{what} grad of {name}", tol))
    return errs


def block_parity(model, ref, s: _Setup, experts: list[str], what: str, *, seed: int = 11, tol: float = TOL,
                 exact_tol: float | None = None) -> dict:
    """Run ``model`` on this data rank's tokens and ``ref`` on every data rank's tokens in one batch, in rank order;
    the loss is ``sum(out * dy)`` with a fixed ``dy``. Returns the max relative errors. ``exact_tol``: the
    tolerance of the output, the input gradient and the expert gradients where they must be (near-)exact."""
    x_all = tp.tokens((s.num_data, B, L, DIM), seed=seed)
    dy_all = tp.tokens((s.num_data, B, L, DIM), seed=seed + 1)
    x = x_all[s.data_id].clone().requires_grad_(True)
    out = _first(model(x))
    (out * dy_all[s.data_id]).sum().backward()
    x_ref = x_all.clone().requires_grad_(True)
    ref_out = _first(ref(x_ref.flatten(0, 1))).reshape(x_all.shape)
    (ref_out * dy_all).sum().backward()
    out_tol = tol if exact_tol is None else exact_tol
    errs = {"output": rel(out, ref_out[s.data_id], f"{what} output", out_tol),
            "input_grad": rel(x.grad, x_ref.grad[s.data_id], f"{what} input grad", out_tol)}
    errs.update(grad_errors(model, ref, s, experts, what, tol, exact_tol))
    return errs


# --- transformers -----------------------------------------------------------------------------------------------------


def transformers_blocks_match_one_process(style: str, families=FAMILIES, impls=("eager",)) -> dict:
    """Every family's sparse MoE block (fp32, seeded weights) through ``parallelize_experts``:
    ``{"family/impl": {output, input_grad, expert_grads, replicated_grads}}`` (max relative errors)."""
    from hyper_parallel.integrations.transformers import parallelize_experts

    s = _setup(style)
    results = {}
    for family in families:
        for impl in impls:
            block = tp.build_transformers_moe_block(family, experts_implementation=impl)
            ref = copy.deepcopy(block)
            names = parallelize_experts(block, s.mesh, s.style)
            assert names == ["experts"], names
            assert block.experts.config._experts_implementation == impl
            results[f"{family}/{impl}"] = block_parity(block, ref, s, names, f"{style} {family} {impl}")
    return results


def qwen3_moe_causal_lm_matches_one_process() -> dict:
    """A whole ``Qwen3MoeForCausalLM`` (2 MoE layers) under ``ExpertParallel``, each rank its own sequences and LM
    loss (labels): the summed loss, the logits and every gradient against the model on one process."""
    from hyper_parallel.integrations.transformers import parallelize_experts

    p = get_platform()
    s = _setup("ep")
    model = tp.build_qwen3_moe_causal_lm(num_layers=2)
    ref = copy.deepcopy(model)
    names = parallelize_experts(model, s.mesh)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"], names
    ids = tp.token_ids((s.num_data, 2, 12), vocab=model.config.vocab_size, seed=3)
    out = model(input_ids=ids[s.data_id], labels=ids[s.data_id])
    out.loss.backward()
    # one process: the sum of the data ranks' losses (each the mean over its own sequences)
    ref_outs = [ref(input_ids=b, labels=b) for b in ids]
    sum(o.loss for o in ref_outs).backward()
    loss = p.all_reduce(out.loss.detach().reshape(1), group=s.data_group)
    errs = {"loss": rel(loss, sum(o.loss.detach() for o in ref_outs).reshape(1), "lm loss"),
            "logits": rel(out.logits, ref_outs[s.data_id].logits, "lm logits")}
    errs.update(grad_errors(model, ref, s, names, "lm"))
    return errs


def _experts_inputs(data_id: int, num_data: int, pattern: str, num_experts: int, top_k: int = 2, tokens: int = 12):
    """``(hidden [T, D], top_k_index [T, K], top_k_weights [T, K])`` of one data rank for a transformers experts
    module. ``"lower_half"``: every token picks experts of the lower half only (the upper EP ranks receive no rows);
    ``"one_rank_empty"``: also, the last data rank has no tokens at all."""
    import torch

    g = torch.Generator().manual_seed(100 + data_id)
    T = 0 if pattern == "one_rank_empty" and data_id == num_data - 1 else tokens
    pool = num_experts // 2
    index = torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(T)]) if T \
        else torch.zeros((0, top_k), dtype=torch.int64)
    weights = torch.rand((T, top_k), generator=g) + 0.5
    return tp.tokens((T, DIM), seed=200 + data_id), index, weights


def transformers_experts_with_empty_ranks(style: str, impl: str = "eager",
                                         families=("qwen3_moe", "gpt_oss")) -> dict:
    """A transformers experts module called directly after the style's ``apply``, with routings that leave the
    upper EP ranks without rows (``"lower_half"``; ``"one_rank_empty"``: and the last data rank without tokens).
    Once with an input needing no gradient (backward reaches the parameters only, and the empty ranks' experts
    return unconnected zeros), once with input and routing weights needing gradients. Must finish (no rank may
    skip an exchange its peers wait in) with the reference's values and gradients."""
    s = _setup(style)
    errs = {}
    for family in families:
        block = tp.build_transformers_moe_block(family, experts_implementation=impl)
        for pattern in ("lower_half", "one_rank_empty"):
            for needs_grad in (False, True):
                what = f"{style} {family} {impl} {pattern} input grad {needs_grad}"
                errs[what] = _experts_with_empty_ranks(block.experts, s, pattern, needs_grad, what)
    return errs


def _experts_with_empty_ranks(base, s: _Setup, pattern: str, needs_grad: bool, what: str) -> dict:
    experts, ref = copy.deepcopy(base), copy.deepcopy(base)
    s.style.apply(experts, s.mesh)
    data = [_experts_inputs(i, s.num_data, pattern, ref.num_experts) for i in range(s.num_data)]
    dys = [tp.tokens(h.shape, seed=300 + i) for i, (h, _, _) in enumerate(data)]
    h, index, weights = (t.clone().requires_grad_(needs_grad and t.is_floating_point()) for t in data[s.data_id])
    out = experts(h, index, weights)
    (out * dys[s.data_id]).sum().backward()
    ref_ins = [tuple(t.clone().requires_grad_(needs_grad and t.is_floating_point()) for t in d) for d in data]
    ref_outs = [ref(*d) for d in ref_ins]
    sum((o * dy).sum() for o, dy in zip(ref_outs, dys)).backward()
    e = {"output": rel(out, ref_outs[s.data_id], what + " output")}
    if needs_grad:
        e["input_grad"] = rel(grad_of(h), grad_of(ref_ins[s.data_id][0]), what + " input grad")
        e["weights_grad"] = rel(grad_of(weights), grad_of(ref_ins[s.data_id][2]), what + " routing weights grad")
    else:
        assert h.grad is None and weights.grad is None
    e.update(grad_errors(experts, ref, s, [""], what))
    if s.mesh.get_coordinate()[0] >= s.mesh.size(0) // 2:  # these ranks' experts received no rows: zero gradients
        assert all(not q.grad.any() for q in experts.parameters()), what
    return e


def gpt_oss_biases_count_once(style: str) -> dict:
    """gpt-oss's experts carry a bias per expert on ``gate_up_proj`` (split with it) and on ``down_proj`` (along the
    model dim: under tensor parallelism every rank adds it to its partial sum, and it must count once). The
    ``down_proj_bias`` is made large so that one extra copy would show plainly; output and bias gradients."""
    import torch

    from hyper_parallel.integrations.transformers import parallelize_experts

    s = _setup(style)
    block = tp.build_transformers_moe_block("gpt_oss")
    with torch.no_grad():
        block.experts.down_proj_bias.mul_(20.0)
    ref = copy.deepcopy(block)
    parallelize_experts(block, s.mesh, s.style)
    for name in ("down_proj_bias", "gate_up_proj_bias"):
        spec = get_parameter_spec(getattr(block.experts, name))
        tp_placement = spec.placements[-1]
        assert tp_placement.is_replicate() if name == "down_proj_bias" else not tp_placement.is_replicate(), \
            (name, spec)
    errs = block_parity(block, ref, s, ["experts"], f"{style} gpt_oss biases")
    for name in ("down_proj_bias", "gate_up_proj_bias"):
        q, want = getattr(block.experts, name), getattr(ref.experts, name).grad
        spec = get_parameter_spec(q)
        errs[f"{name} grad"] = rel(q.grad, np_local(_np(want), spec.device_mesh, spec.placements), f"{style} {name}")
    return errs


# --- torchtitan -------------------------------------------------------------------------------------------------------


def split_hidden_reference(experts, parts: int) -> None:
    """Make torchtitan's ``GroupedExperts`` ``experts`` (left whole) compute as ``parts`` tensor-parallel ranks do:
    its own forward on each slice of the hidden dim, the outputs summed in float32.

    Its forward rounds its output to bfloat16 before casting back: under tensor parallelism each rank rounds its
    partial sum (then they are all-reduced in float32), where one device rounds the whole sum once. That differs by
    bfloat16 rounding (~1e-3 relative): the model's own numerics, not the parallelism's. With this reference the
    comparison is exact again up to float32 rounding. The parameters stay the same (same names, full gradients).
    """
    import types

    forward = type(experts).forward
    F = int(experts.w1_EFD.shape[1])

    def split_forward(self, x_RD, num_tokens_per_expert_E):
        out, n = 0, F // parts
        for k in range(parts):
            h = slice(k * n, (k + 1) * n)
            part = types.SimpleNamespace(w1_EFD=self.w1_EFD[:, h], w2_EDF=self.w2_EDF[:, :, h],
                                         w3_EFD=self.w3_EFD[:, h], _grouped_mm=self._grouped_mm)
            out = out + forward(part, x_RD, num_tokens_per_expert_E)
        return out

    experts.forward = types.MethodType(split_forward, experts)


def _tp_degree(s: _Setup) -> int:
    names = s.mesh.mesh_dim_names or ()
    return s.mesh["tp"].size() if "tp" in names else 1


def torchtitan_moe_matches_one_process(style: str, shared_experts: bool = True) -> dict:
    """torchtitan's ``MoE`` (router, ``GroupedExperts``, shared experts) through ``parallelize_moe``. Under tensor
    parallelism the reference's experts sum per-slice bfloat16 outputs (:func:`split_hidden_reference`); the true
    one-device reference is then checked too, to bfloat16 rounding."""
    from hyper_parallel.integrations.torchtitan import parallelize_moe

    s = _setup(style)
    moe = tp.build_torchtitan_moe(shared_experts=shared_experts)
    ref = copy.deepcopy(moe)
    whole = copy.deepcopy(moe) if _tp_degree(s) > 1 else None
    names = parallelize_moe(moe, s.mesh, s.style)
    assert names == ["routed_experts.inner_experts"], names
    if whole is not None:
        split_hidden_reference(ref.routed_experts.inner_experts, _tp_degree(s))
    errs = block_parity(moe, ref, s, names, f"{style} torchtitan", exact_tol=EXACT)
    if whole is not None:  # the same tokens through the model on one device, unsplit: bfloat16 rounding apart
        x_all = tp.tokens((s.num_data, B, L, DIM), seed=11)
        want = whole(x_all.flatten(0, 1)).reshape(x_all.shape)[s.data_id]
        got = ref(x_all.flatten(0, 1)).reshape(x_all.shape)[s.data_id]
        errs["output vs unsplit one device"] = rel(got, want, f"{style} torchtitan unsplit reference", 5e-3)
    return errs


def _grouped_rows(data_id: int, counts: list[int]):
    import torch

    return tp.tokens((sum(counts), DIM), seed=400 + data_id), torch.tensor(counts, dtype=torch.int64)


def torchtitan_experts_with_empty_ranks(style: str) -> dict:
    """torchtitan's ``GroupedExperts`` called directly after the style's ``apply``, with counts that give the upper
    EP ranks no rows (and the last data rank no rows to send), with and without an input gradient. The reference
    computes each expert's rows in the order the ranks deliver them (rank by rank): bit-for-bit the same
    bfloat16 sums."""
    import torch

    s = _setup(style)
    base = tp.build_torchtitan_moe().routed_experts.inner_experts
    E = base.num_experts
    counts = [[(i + e) % 3 + 1 if e < E // 2 and i < s.num_data - 1 else 0 for e in range(E)]
              for i in range(s.num_data)]
    counts[0][1] = 0  # and an expert nobody routes to
    data = [_grouped_rows(i, c) for i, c in enumerate(counts)]
    dys = [tp.tokens(x.shape, seed=500 + i) for i, (x, _) in enumerate(data)]
    # the reference's rows: expert by expert, each expert's rows rank by rank; where each rank's rows land
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in counts]
    order, slots = [], [[] for _ in range(s.num_data)]
    for e in range(E):
        for i in range(s.num_data):
            slots[i] += range(len(order), len(order) + counts[i][e])
            order += [(i, int(starts[i][e]) + r) for r in range(counts[i][e])]
    errs = {}
    for needs_grad in (False, True):
        experts, ref = copy.deepcopy(base), copy.deepcopy(base)
        s.style.apply(experts, s.mesh)
        if _tp_degree(s) > 1:
            split_hidden_reference(ref, _tp_degree(s))
        what = f"{style} torchtitan GroupedExperts empty ranks, input grad {needs_grad}"
        x, c = data[s.data_id]
        x = x.clone().requires_grad_(needs_grad)
        out = experts(x, c)
        (out * dys[s.data_id]).sum().backward()
        x_ref = torch.cat([data[i][0][j:j + 1] for i, j in order]).requires_grad_(needs_grad)
        dy_ref = torch.cat([dys[i][j:j + 1] for i, j in order])
        ref_out = ref(x_ref, torch.tensor([sum(cs[e] for cs in counts) for e in range(E)]))
        (ref_out * dy_ref).sum().backward()
        mine = torch.tensor(slots[s.data_id], dtype=torch.int64)
        e = {"output": rel(out, ref_out[mine], what + " output", EXACT)}
        if needs_grad:
            e["input_grad"] = rel(grad_of(x), grad_of(x_ref)[mine], what + " input grad", EXACT)
        e.update(grad_errors(experts, ref, s, [""], what, expert_tol=EXACT))
        errs[f"input grad {needs_grad}"] = e
    return errs


# --- bad input --------------------------------------------------------------------------------------------------------


def bad_inputs() -> bool:
    """Each refusal of the integrations and of a top-k experts module's hook, with its message."""
    import torch
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    from hyper_parallel.integrations.torchtitan import parallelize_moe
    from hyper_parallel.integrations.transformers import parallelize_experts

    p = get_platform()
    mesh = init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",))
    # transformers
    _raises(ValueError, r"parallelize_experts: Sequential has no transformers experts module \(a class built by "
            r"use_experts_implementation, transformers 5\.", parallelize_experts,
            torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh)
    block = tp.build_transformers_moe_block("qwen3_moe")
    _raises(TypeError, r"parallelize_experts: style must be ExpertParallel, TensorParallel or ExpertTensorParallel "
            r"\(a BaseExpertParallel\), got str", parallelize_experts, block, mesh, "ep")
    _raises(TypeError, r"parallelize_experts: model must be a torch.nn.Module, got dict", parallelize_experts, {}, mesh)
    assert get_parameter_spec(block.experts.gate_up_proj) is None  # refused before any change
    assert parallelize_experts(block, mesh) == ["experts"]
    _raises(ValueError, r"parallelize_experts: experts already carries an expert style", parallelize_experts, block,
            mesh)
    # after apply, the experts are called as their block calls them: anything else is refused clearly
    h = tp.tokens((4, DIM))
    index = torch.zeros((4, 2), dtype=torch.int64)
    weights = torch.ones((4, 2))
    _raises(ValueError, r"ExpertParallel: Qwen3MoeExperts is called with the top-k routing, as "
            r"experts\(hidden_states, top_k_index, top_k_weights\); got 2 positional arguments", block.experts, h,
            index)
    _raises(ValueError, r"got 4 positional arguments", block.experts, h, index, weights, None)
    _raises(ValueError, r"ExpertParallel: top_k_index and top_k_weights must both be \[tokens, top_k\] for "
            r"hidden_states of 4 tokens, got \[4, 2\] and \[4, 3\]", block.experts, h, index, torch.ones((4, 3)))
    # torchtitan
    _raises(ValueError, r"parallelize_moe: Sequential contains no torchtitan MoE \(RoutedExperts\)", parallelize_moe,
            torch.nn.Sequential(torch.nn.Linear(4, 4)), mesh)
    _raises(TypeError, r"parallelize_moe: style must be ExpertParallel, TensorParallel or ExpertTensorParallel",
            parallelize_moe, tp.build_torchtitan_moe(), mesh, object())
    # built with torchtitan's own expert-parallel dispatcher (constructible without a mesh): the tokens would be
    # exchanged twice
    moe = MoE.Config(
        num_experts=8,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=DIM, hidden_dim=HIDDEN, num_experts=8),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=8, top_k=2)),
        router=TokenChoiceTopKRouter.Config(num_experts=8, top_k=2,
                                            gate=Linear.Config(in_features=DIM, out_features=8)),
    ).build()
    _raises(ValueError, r"parallelize_moe: routed_experts.token_dispatcher is AllToAllTokenDispatcher, which does its "
            r"own token exchange; build the model with torchtitan's LocalTokenDispatcher", parallelize_moe, moe, mesh)
    assert get_parameter_spec(moe.routed_experts.inner_experts.w1_EFD) is None
    return True
