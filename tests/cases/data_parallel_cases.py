"""DataParallel + the framework's AdamW + global-norm clipping on (dp, ep), (dp, tp) and (ep, tp) meshes against
the same model trained on one device on every rank's batch."""

from __future__ import annotations

import numpy as np

from hyper_parallel import (
    DataParallel,
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    clip_grad_norm_,
    clip_grads,
    full_parameter,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    moe,
    reduce_gradients,
)
from hyper_parallel.testing.conformance.errors import raises as _raises
from tests.cases.dtensor_cases import _host, _t
from tests.cases.ep_cases import assert_rel

D, H, G, K, TOKENS = 8, 8, 8, 2, 6
MAX_NORM, LR, STEPS = 0.05, 1e-2, 3


def _model():
    return moe.MoE(dim=D, hidden_dim=H, num_experts=G, top_k=K, num_shared_experts=1, init_std=0.3, seed=3)


def _batch(step: int, data_id: int):
    rng = np.random.RandomState(1000 * step + data_id)
    return rng.randn(TOKENS, D), rng.randn(TOKENS, D)


def _layout(name: str, model):
    """Apply the layout's styles; return (DataParallel, this rank's data id, number of data ids)."""
    world = get_platform().get_world_size()
    if name == "dp_ep":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
        ExpertParallel().apply(model.experts, mesh["ep"])
        return mesh, DataParallel(data_axes=("dp", "ep")), mesh.get_local_rank("dp") * mesh.size("ep") + \
            mesh.get_local_rank("ep"), world
    if name == "dp_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        TensorParallel().apply(model.experts, mesh["tp"])
        return mesh, DataParallel(data_axes=("dp",)), mesh.get_local_rank("dp"), 2
    if name == "ep_tp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
        ExpertTensorParallel().apply(model.experts, mesh)
        return mesh, DataParallel(data_axes=("ep",)), mesh.get_local_rank("ep"), 2
    raise ValueError(name)


def _loss(model, x, t):
    return ((model(_t(x)) - _t(t)) ** 2).mean()


class _Trainer:
    """One training step on either framework: loss, gradients (reduced by DataParallel), clipping, AdamW."""

    def __init__(self, model, data_parallel: bool):
        self.p = get_platform()
        self.model, self.dp = model, data_parallel
        self.params = [q for _, q in self.p.named_parameters(model) if q.requires_grad]
        if self.p.name.startswith("torch"):
            import torch

            self.opt = torch.optim.AdamW(self.params, lr=LR)
        else:
            import mindspore

            self.opt = mindspore.nn.AdamWeightDecay(self.params, learning_rate=LR)  # mint AdamW: no CPU kernel

    def step(self, batches):
        """``batches``: the (x, target) pairs this model sees; the loss is their mean."""
        def loss_fn():
            total = None
            for x, t in batches:
                loss = _loss(self.model, x, t)
                total = loss if total is None else total + loss
            return total / len(batches)

        if self.p.name.startswith("torch"):
            loss = loss_fn()
            loss.backward()  # DataParallel's hooks reduce the gradients during backward
            norm = clip_grad_norm_(self.params, MAX_NORM)
            self.opt.step()
            self.opt.zero_grad()
            return float(loss), float(norm)
        import mindspore

        loss, grads = mindspore.value_and_grad(loss_fn, None, self.params)()
        if self.dp:
            grads = reduce_gradients(self.model, grads, self.params)
        grads, norm = clip_grads(grads, self.params, MAX_NORM)
        self.opt(grads)
        return float(loss.asnumpy()), float(norm.asnumpy())


def trains_like_one_device(layout: str) -> dict:
    p = get_platform()
    model, ref = _model(), _model()
    mesh, dp, data_id, num_data = _layout(layout, model)
    dp.apply(model, mesh)
    trainer, ref_trainer = _Trainer(model, True), _Trainer(ref, False)
    norms = []
    with p.count_calls() as calls:
        loss, norm = trainer.step([_batch(0, data_id)])
    ref_loss, ref_norm = ref_trainer.step([_batch(0, i) for i in range(num_data)])
    norms.append((norm, ref_norm))
    for step in range(1, STEPS):
        loss, norm = trainer.step([_batch(step, data_id)])
        ref_loss, ref_norm = ref_trainer.step([_batch(step, i) for i in range(num_data)])
        norms.append((norm, ref_norm))
    what = f"{layout} rank {p.get_rank()}"
    for got, want in norms:
        assert abs(got - want) <= 1e-5 * want, f"{what}: clipping's total norm {got} != single device {want}"
    assert norms[0][1] > MAX_NORM, "the test must clip"
    for (name, q), (_, r) in zip(p.named_parameters(model), p.named_parameters(ref)):
        full = full_parameter(q) if get_parameter_spec(q) is not None else q
        assert_rel(_host(full), _host(r), f"{what} {name} after {STEPS} AdamW steps")
    return {"all_reduce": calls["all_reduce"]}


def bad_data_axes() -> bool:
    world = get_platform().get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    model = _model()
    ExpertTensorParallel().apply(model.experts, mesh)
    _raises(ValueError, r"data axes \['dp'\] are not axes of the mesh, whose axes are \['ep', 'tp'\]",
            DataParallel(data_axes=("dp",)).apply, model, mesh)
    _raises(ValueError, r"axis 'tp' splits experts\.w1 as Shard\(dim=1\), which is tensor parallelism",
            DataParallel(data_axes=("ep", "tp")).apply, model, mesh)
    _raises(ValueError, r"data_axes must be distinct mesh axis names", DataParallel, data_axes=())
    DataParallel(data_axes=("ep",)).apply(model, mesh)
    _raises(ValueError, r"already has DataParallel applied", DataParallel(data_axes=("ep",)).apply, model, mesh)
    # the styles after DataParallel: the replaced parameters would miss its reduction (their gradients 2x or summed
    # over other experts' ranks, silently), so every style refuses, before touching any parameter
    for style, sub in ((ExpertParallel(), mesh["ep"]), (TensorParallel(), mesh["tp"]),
                       (ExpertTensorParallel(), mesh)):
        late = _model()
        DataParallel(data_axes=("ep",)).apply(late, mesh)
        before = [id(q) for _, q in get_platform().named_parameters(late)]
        _raises(ValueError, r"GroupedExperts\.w1 is already under DataParallel, which planned its gradient as a "
                            r"replicated parameter's; apply the expert and tensor parallel styles first",
                style.apply, late.experts, sub)
        assert [id(q) for _, q in get_platform().named_parameters(late)] == before
    return True


def global_aux_loss() -> bool:
    """LoadBalancingLossTracker.loss(group=...): the loads summed over the group (Megatron-Core's global auxiliary
    loss), this rank's scores; value and gradient against NumPy."""
    from hyper_parallel.moe.losses import LoadBalancingLossTracker

    p = get_platform()
    world, rank = p.get_world_size(), p.get_rank()
    T, E, L = 5, 4, 2
    rngs = [np.random.RandomState(50 + r) for r in range(world)]
    data = [([rng.rand(T, E) for _ in range(L)], [rng.randint(0, 4, E) for _ in range(L)]) for rng in rngs]
    scores, counts = data[rank]
    tracker = LoadBalancingLossTracker()
    group = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)).get_group("dp")

    def loss_fn(*layer_scores):
        tracker.clear()
        for s, c in zip(layer_scores, counts):
            tracker.save(s, p.tensor([int(v) for v in c], dtype="int64"))
        return tracker.loss(top_k=K, coeff=0.5, group=group)

    value, grads, _ = p.value_and_grad(loss_fn, [_t(s) for s in scores])
    global_counts = [sum(data[r][1][layer] for r in range(world)) / world for layer in range(L)]
    want = 0.5 * E / (L * T * K) * sum((global_counts[layer] * scores[layer].mean(0)).sum() for layer in range(L))
    assert abs(float(_host(value)) - want) <= 1e-6 * abs(want), (float(_host(value)), want)
    for layer in range(L):  # d loss / d scores[t, e] = coeff * E * f_e / (L * T * K * T) for every token t
        want_grad = np.tile(0.5 * E * global_counts[layer] / (L * T * K * T), (T, 1))
        assert_rel(_host(grads[layer]), want_grad, f"rank {rank} layer {layer} score gradient")
    return True


def accumulating_onto_a_reduced_gradient_is_refused() -> bool:
    """torch: a second backward into gradients DataParallel already reduced (no zero_grad between) would reduce the
    earlier part twice: refused on every rank; after zero_grad the next step works."""
    import torch

    p = get_platform()
    model = _model()
    mesh, dp, data_id, _ = _layout("dp_ep", model)
    dp.apply(model, mesh)
    _loss(model, *_batch(0, data_id)).backward()
    try:
        _loss(model, *_batch(1, data_id)).backward()
    except RuntimeError as e:
        assert "reduced by an earlier backward and not cleared" in str(e) and "zero_grad" in str(e), str(e)
    else:
        raise AssertionError("a second backward accumulated onto reduced gradients")
    torch.optim.AdamW(model.parameters(), lr=LR).zero_grad()
    _loss(model, *_batch(2, data_id)).backward()
    return all(q.grad is not None for _, q in p.named_parameters(model))
