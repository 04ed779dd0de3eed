"""hyper_parallel.checkpoint on every rank: save at one layout, load at another (or in the other framework), and
compare every gathered parameter, the optimizer state and the forward output bit for bit."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
from unittest import mock

import numpy as np

from hyper_parallel import (
    DataParallel,
    DTensor,
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    checkpoint,
    full_parameter,
    get_platform,
    init_device_mesh,
    moe,
    named_parameter_specs,
    reduce_gradients,
)
from hyper_parallel.checkpoint import _checkpoint
from tests.cases.dtensor_cases import np_local
from tests.cases.ep_cases import assert_rel
from tests.cases.layout_cases import _fused_experts, fused_layout

D, H, E, K, T = 6, 8, 4, 2, 5
LR = 0.05


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _raises(exc: type, pattern: str):
    """The block raises ``exc`` with a message matching ``pattern`` (``re.search``)."""
    try:
        yield
    except exc as e:
        assert re.search(pattern, str(e)), f"message {str(e)!r} does not match {pattern!r}"
    else:
        raise AssertionError(f"did not raise {exc.__name__} ({pattern!r})")


def _mesh_of(layout: str):
    world = get_platform().get_world_size()
    if layout == "etp":
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    return init_device_mesh("cpu", (world,), mesh_dim_names=("tp" if layout == "tp" else "ep",))


def build(layout: str, seed: int, use_expert_bias: bool = True, hidden: int = H):
    """A MoE with a shared expert and the expert bias, weights from ``seed``, its experts laid out by ``layout``:
    ``"one"`` (unparallelized), ``"ep"`` (ExpertParallel over the world), ``"etp"`` (ExpertTensorParallel 2 x
    world/2)."""
    model = moe.MoE(dim=D, hidden_dim=hidden, num_experts=E, top_k=K, num_shared_experts=1,
                    use_expert_bias=use_expert_bias, init_std=0.5, seed=seed)
    if layout == "ep":
        ExpertParallel().apply(model.experts, _mesh_of("ep"))
    elif layout == "etp":
        ExpertTensorParallel().apply(model.experts, _mesh_of("etp"))
    return model


def _data_id(layout: str) -> int:
    p = get_platform()
    if not p.is_initialized():
        return 0
    # ETP: the ranks of one tp line hold the same tokens (mesh (2, world/2), row-major: the ep coordinate)
    return p.get_rank() // (p.get_world_size() // 2) if layout == "etp" else p.get_rank()


def _x(data_id: int):
    return get_platform().tensor(np.random.RandomState(11 + data_id).randn(T, D).astype(np.float32))


def full_state(model) -> dict[str, np.ndarray]:
    """Every parameter's full tensor on the host (sharded ones all-gathered), without the rank-local counts."""
    p = get_platform()
    return {name: p.to_numpy(full_parameter(q) if spec is not None else q).copy()
            for name, q, spec in named_parameter_specs(model) if name != "tokens_per_expert"}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), f"{what}: names {list(got)} != {list(want)}"
    for name in want:
        assert got[name].dtype == want[name].dtype, f"{what}: {name} dtype {got[name].dtype} != {want[name].dtype}"
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


def _set_full(model, full: dict) -> None:
    """Give ``model`` the parameters ``full`` directly (each rank its shard), the reference a load must equal."""
    p = get_platform()
    for name, q, spec in named_parameter_specs(model):
        if name in full:
            local = full[name] if spec is None else np_local(full[name], spec.device_mesh, spec.placements)
            p.assign(q, p.tensor(np.ascontiguousarray(local), dtype=p.dtype_name(q.dtype)))


def _what(layout: str) -> str:
    p = get_platform()
    world = p.get_world_size() if p.is_initialized() else 1
    rank = p.get_rank() if p.is_initialized() else 0
    return f"{p.name} {layout} x{world} rank {rank}"


def _counts(model) -> list[float]:
    return get_platform().to_numpy(model.tokens_per_expert).tolist()


# ---------------------------------------------------------------------------------------------- round trips
def first_save(layout: str, path: str) -> dict:
    """A trained-looking model (a non-zero expert bias, per-rank counts) saved at ``layout``; returns its full
    parameters and this rank's counts."""
    p = get_platform()
    model = build(layout, seed=0)
    x = _x(_data_id(layout))
    model(x)
    model.update_expert_bias(0.1, group=p.init_process_group() if p.is_initialized() else None)
    model(x)  # counts since the update: differ per rank
    checkpoint.save(path, model, extra={"step": 7, "rank": p.get_rank() if p.is_initialized() else 0})
    return {"full": full_state(model), "counts": _counts(model)}


def load_check_save(layout: str, src: str, want: dict, saved_counts: list, dst: str | None) -> dict:
    """Load ``src`` into a model of other weights at ``layout``: every parameter, the forward output (against a
    model of this layout given the same parameters directly) and the counts; then save to ``dst``."""
    p = get_platform()
    what = _what(layout) + f" loading {src}"
    model = build(layout, seed=1)
    assert any(not np.array_equal(a, want[n]) for n, a in full_state(model).items()), what + ": nothing to load"
    extra = checkpoint.load(src, model)
    assert set(extra) == {"step", "rank"} and extra["step"] == 7, extra
    _assert_same(full_state(model), want, what)
    x = _x(_data_id(layout))
    reference = build(layout, seed=1)
    _set_full(reference, want)
    np.testing.assert_array_equal(p.to_numpy(model(x)), p.to_numpy(reference(x)), err_msg=what + ": output")
    # the counts: this rank's own at the world size saved, else their sum on rank 0
    world = p.get_world_size() if p.is_initialized() else 1
    rank = p.get_rank() if p.is_initialized() else 0
    if len(saved_counts) == world:
        want_counts = saved_counts[rank]
        assert extra["rank"] == rank, extra
    else:
        want_counts = list(np.sum(saved_counts, axis=0)) if rank == 0 else [0.0] * E
    loaded_counts = np.asarray(_counts(model)) - np.asarray(_counts(reference))  # minus the forward's own
    np.testing.assert_array_equal(loaded_counts, np.asarray(want_counts, dtype=np.float32), err_msg=what)
    # the loaded counts as they were before this test's forward, saved onwards
    p.assign(model.tokens_per_expert, p.tensor(np.asarray(want_counts, dtype=np.float32)))
    if dst is not None:
        checkpoint.save(dst, model, extra=extra)
    return {"full": full_state(model), "counts": _counts(model)}


def fused_save(path: str) -> dict:
    """Fused ``gate_up`` experts (``StridedShard`` under tensor parallelism) saved at ExpertTensorParallel 2 x 2."""
    experts = _fused_experts("concat")
    ExpertTensorParallel(layout=fused_layout("concat")).apply(experts, _mesh_of("etp"))
    spec = [s for n, _, s in named_parameter_specs(experts) if n == "gate_up"][0]
    assert spec.placements[1].is_strided_shard(), spec
    checkpoint.save(path, experts)
    return full_state(experts)


def fused_load(layout: str, src: str, want: dict, dst: str | None) -> bool:
    """Load fused experts at ``layout`` ("tp": StridedShard alone, "ep", "one"), compare each rank's shard."""
    p = get_platform()
    rng = np.random.RandomState(3)
    experts = _fused_experts("concat")
    for _, q in p.named_parameters(experts):  # other weights than the saved ones
        p.assign(q, p.tensor(rng.randn(*q.shape).astype(np.float32)))
    if layout == "tp":
        TensorParallel(layout=fused_layout("concat")).apply(experts, _mesh_of("tp"))
    elif layout == "ep":
        ExpertParallel(layout=fused_layout("concat")).apply(experts, _mesh_of("ep"))
    checkpoint.load(src, experts)
    _assert_same(full_state(experts), want, _what(layout) + " fused")
    for name, q, spec in named_parameter_specs(experts):
        local = want[name] if spec is None else np_local(want[name], spec.device_mesh, spec.placements)
        np.testing.assert_array_equal(p.to_numpy(q), local, err_msg=f"{_what(layout)} fused {name} shard")
    if dst is not None:
        checkpoint.save(dst, experts)
    return True


# ---------------------------------------------------------------------------------------------- optimizer
class _Trainer:
    """The framework's AdamW over the trainable parameters, with DataParallel over the ep axis (the replicated
    parameters' gradients all-reduced: equal on every rank, bit for bit). Every rank trains on the same tokens, so
    one process on those tokens takes the same steps."""

    def __init__(self, model, layout: str):
        self.p = get_platform()
        self.model = model
        self.data_parallel = layout != "one"
        if self.data_parallel:
            DataParallel(data_axes=("ep",)).apply(model, _mesh_of(layout))
        self.params = [q for _, q in self.p.named_parameters(model) if q.requires_grad]
        if self.p.name.startswith("torch"):
            import torch

            self.opt = torch.optim.AdamW(self.params, lr=LR)
        else:
            import mindspore

            self.opt = mindspore.nn.AdamWeightDecay(self.params, learning_rate=LR)

    def step(self, step: int) -> None:
        x = _x(100 + step)

        def loss_fn():
            return (self.model(x) ** 2).mean()

        if self.p.name.startswith("torch"):
            loss = loss_fn()
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            return float(loss)
        import mindspore

        loss, grads = mindspore.value_and_grad(loss_fn, None, self.params)()
        if self.data_parallel:
            grads = reduce_gradients(self.model, grads, self.params)
        self.opt(grads)
        return float(loss.asnumpy())


def optimizer_state(model, opt) -> dict[str, np.ndarray]:
    """``{"<param>/exp_avg": full tensor, ..., "<param>/step": step}`` of either framework's AdamW."""
    p = get_platform()
    specs = {id(q): (name, q, spec) for name, q, spec in named_parameter_specs(model)}

    def full(t, q):
        name, _, spec = specs[id(q)]
        if spec is not None:
            t = DTensor.from_local(t, spec.device_mesh, spec.placements, shape=spec.shape).full_tensor()
        return p.to_numpy(t).copy()

    out = {}
    if hasattr(opt, "moments1"):
        step = float(p.to_numpy(opt.global_step).reshape(-1)[0])
        for i, q in enumerate(opt._parameters):
            name = specs[id(q)][0]
            out[f"{name}/exp_avg"], out[f"{name}/exp_avg_sq"] = full(opt.moments1[i], q), full(opt.moments2[i], q)
            out[f"{name}/step"] = np.float64(step)
    else:
        for group in opt.param_groups:
            for q in group["params"]:
                name = specs[id(q)][0]
                st = opt.state[q]
                out[f"{name}/exp_avg"], out[f"{name}/exp_avg_sq"] = full(st["exp_avg"], q), full(st["exp_avg_sq"], q)
                out[f"{name}/step"] = np.float64(float(st["step"]))
    return out


def train_save_step(layout: str, path: str) -> dict:
    """Two AdamW steps, save (model, optimizer, extra), a third step: returns the saved optimizer state and the
    parameters after the third step."""
    model = build(layout, seed=0)
    trainer = _Trainer(model, layout)
    trainer.step(0)
    trainer.step(1)
    checkpoint.save(path, model, trainer.opt, extra={"step": 2, "data_position": 2 * T})
    saved = {"opt": optimizer_state(model, trainer.opt), "full": full_state(model)}
    trainer.step(2)
    saved["after"] = full_state(model)
    return saved


def load_resume(layout: str, path: str, saved: dict, step_again: str | None) -> dict:
    """A fresh model and optimizer load ``path``: the optimizer state equals the saved one (resharded). With
    ``step_again="exact"`` (the saving layout) the third step equals the one taken without save/load bit for bit;
    with ``"close"`` (another layout: other summation orders) within 1e-5 relative."""
    model = build(layout, seed=1)
    trainer = _Trainer(model, layout)
    what = _what(layout) + " resume"
    extra = checkpoint.load(path, model, trainer.opt)
    assert extra == {"step": 2, "data_position": 2 * T}, extra
    _assert_same(full_state(model), saved["full"], what + " parameters")
    _assert_same(optimizer_state(model, trainer.opt), saved["opt"], what + " optimizer state")
    if step_again:
        trainer.step(2)
        after = full_state(model)
        if step_again == "exact":
            _assert_same(after, saved["after"], what + " after the next step")
        for name, value in saved["after"].items():
            assert_rel(after[name].astype(np.float64), value.astype(np.float64), f"{what} {name} after the next step")
    return {"opt": optimizer_state(model, trainer.opt), "full": full_state(model)}


def cross_framework_load(layout: str, path: str, saved: dict, dst: str | None) -> dict:
    """Load a checkpoint of the other framework (model and AdamW moments), compare, optionally save again."""
    model = build(layout, seed=1)
    trainer = _Trainer(model, layout)
    what = _what(layout) + " from the other framework"
    checkpoint.load(path, model, trainer.opt)
    _assert_same(full_state(model), saved["full"], what + " parameters")
    _assert_same(optimizer_state(model, trainer.opt), saved["opt"], what + " optimizer state")
    out = get_platform().to_numpy(model(_x(0))).copy()
    if dst is not None:
        checkpoint.save(dst, model, trainer.opt)
    return {"out": out}


def forward_output(layout: str, path: str) -> np.ndarray:
    model = build(layout, seed=1)
    checkpoint.load(path, model)
    return get_platform().to_numpy(model(_x(0))).copy()


# ---------------------------------------------------------------------------------------------- faults
def _index_bytes(path: str) -> bytes:
    with open(os.path.join(path, checkpoint.INDEX_FILE), "rb") as f:
        return f.read()


def crash_during_save_keeps_the_previous(path: str) -> bool:
    """An error on one rank after it wrote its file, then on rank 0 while moving the new checkpoint into place:
    every rank raises, ``path`` still holds the previous checkpoint, which loads; a later save succeeds."""
    p = get_platform()
    rank = p.get_rank()
    old = build("ep", seed=0)
    checkpoint.save(path, old)
    want, before = full_state(old), _index_bytes(path)
    new = build("ep", seed=1)

    real_write = _checkpoint.write_safetensors

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        raise OSError("simulated crash after writing this rank's file")

    def die_publishing(tmp, dst):
        raise OSError("simulated crash before the new checkpoint is moved into place")

    for target, fake, failing_rank in (("write_safetensors", write_then_die, 1), ("_publish", die_publishing, 0)):
        with mock.patch.object(_checkpoint, target, fake if rank == failing_rank else getattr(_checkpoint, target)):
            expected = OSError if rank == failing_rank else RuntimeError
            match = "simulated crash" if rank == failing_rank else rf"failed on rank\(s\) \[{failing_rank}\]"
            with _raises(expected, match):
                checkpoint.save(path, new)
        assert _index_bytes(path) == before, f"rank {rank}: the previous index changed ({target})"
        loaded = build("ep", seed=2)
        checkpoint.load(path, loaded)
        _assert_same(full_state(loaded), want, f"rank {rank}: the previous checkpoint after a crash in {target}")
    checkpoint.save(path, new)  # a later save cleans up the interrupted one's directory
    loaded = build("ep", seed=2)
    checkpoint.load(path, loaded)
    _assert_same(full_state(loaded), full_state(new), f"rank {rank}: the save after the crashes")
    left = sorted(os.listdir(os.path.dirname(path)))
    assert left == [os.path.basename(path)], left
    return True


def bad_loads(path: str) -> bool:
    """Every misfit is named: missing / unexpected keys, shapes, dtypes, damaged files, a missing optimizer
    state, a bad extra, a path that is not a checkpoint."""
    p = get_platform()
    rank = p.get_rank()
    model = build("ep", seed=0)
    checkpoint.save(path, model)
    with _raises(ValueError, r"unexpected keys \(in the checkpoint, not in the model\): \['expert_bias', "
                             r"'tokens_per_expert'\]"):
        checkpoint.load(path, build("ep", seed=0, use_expert_bias=False))
    with _raises(ValueError, r"shape mismatch: experts.w1: checkpoint \[4, 8, 6\], model \[4, 12, 6\]; experts.w2: "
                             r"checkpoint \[4, 6, 8\], model \[4, 6, 12\]"):
        checkpoint.load(path, build("ep", seed=0, hidden=12))
    cast = build("ep", seed=0)
    p.replace_parameter(cast.router, "gate", cast.router.gate.to(p.dtype("float64")))
    with _raises(TypeError, r"dtype mismatch .*router.gate: checkpoint float32, model float64"):
        checkpoint.load(path, cast)
    with _raises(ValueError, r"holds no optimizer state \(it was saved without optimizer=\)"):
        checkpoint.load(path, model, _Trainer(model, "one").opt)
    with _raises(TypeError, r"extra must be JSON-serialisable"):
        checkpoint.save(path, model, extra={"rng": object()})
    with _raises(ValueError, r"no checkpoint at .*nowhere \(no index.json\)"):
        checkpoint.load(path + "-nowhere", model)
    not_a_checkpoint = os.path.join(os.path.dirname(path), "data")
    if rank == 0:
        os.makedirs(not_a_checkpoint)
        with open(os.path.join(not_a_checkpoint, "keep.txt"), "w") as f:
            f.write("user data")
    p.barrier()
    with _raises(ValueError, r"exists and is not a hyper_parallel.checkpoint checkpoint .* refusing to replace"):
        checkpoint.save(not_a_checkpoint, model)
    assert os.listdir(not_a_checkpoint) == ["keep.txt"]
    # damaged files: truncated, then missing
    damaged = path + "-damaged"
    if rank == 0:
        shutil.copytree(path, damaged)
        with open(os.path.join(damaged, "rank00001.safetensors"), "r+b") as f:
            f.truncate(100)
    p.barrier()
    with _raises(ValueError, r"damaged: rank00001.safetensors has 100 bytes, the index says \d+ \(truncated"):
        checkpoint.load(damaged, build("ep", seed=1))
    if rank == 0:
        os.remove(os.path.join(damaged, "rank00001.safetensors"))
    p.barrier()
    with _raises(ValueError, r"damaged: rank00001.safetensors is missing"):
        checkpoint.load(damaged, build("ep", seed=1))
    return True


# ---------------------------------------------------------------------------------------------- export
def export_model(layout: str, path: str, max_shard_bytes: int | None) -> dict:
    """Export a model laid out by ``layout``; returns its full parameters and the files written."""
    model = build(layout, seed=0)
    x = _x(_data_id(layout))
    model(x)
    model.update_expert_bias(0.1, group=get_platform().init_process_group())
    files = checkpoint.export(path, model, max_shard_bytes=max_shard_bytes)
    return {"full": full_state(model), "files": files}


def import_export(layout: str, path: str, want: dict) -> bool:
    """Load an exported set (the model's own names) into ``layout``: every parameter; the counts stay zero."""
    model = build(layout, seed=1)
    checkpoint.load(path, model)
    _assert_same(full_state(model), want, _what(layout) + " importing an export")
    assert _counts(model) == [0.0] * E
    with _raises(ValueError, r"holds no optimizer state"):
        checkpoint.load(path, model, _Trainer(model, "one").opt)
    return True


def transformers_export(path: str) -> bool:
    """A whole ``Qwen3MoeForCausalLM`` under ExpertParallel, exported: transformers' ``from_pretrained`` loads the
    set into the same parameters as the unparallelized model (bit for bit); the set imports back into the
    expert-parallel layout (torch only)."""
    import torch

    from hyper_parallel.integrations.transformers import parallelize_experts
    from tests import third_party as tp

    p = get_platform()
    model = tp.build_qwen3_moe_causal_lm(num_layers=2)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    parallelize_experts(model, _mesh_of("ep"))
    # transformers' own save would write one rank's shards or fail on rank 0 only: refused on every rank, with the way
    # that works (this export); the model still deep-copies
    with _raises(ValueError, r"save_pretrained cannot save a model whose experts are sharded over ranks .* On every "
                             r"rank: hyper_parallel\.checkpoint\.export\(path, model\)"):
        model.save_pretrained(path)
    assert not os.path.exists(os.path.join(path, "config.json"))
    copy.deepcopy(model)
    checkpoint.export(path, model, max_shard_bytes=20000)
    if p.get_rank() == 0:
        model.config.save_pretrained(path)
        loaded = type(model).from_pretrained(path).state_dict()
        assert sorted(loaded) == sorted(ref), sorted(set(loaded) ^ set(ref))
        for name, value in ref.items():
            assert torch.equal(loaded[name], value), name
    p.barrier()
    other = tp.build_qwen3_moe_causal_lm(num_layers=2, seed=1)
    parallelize_experts(other, _mesh_of("ep"))
    checkpoint.load(path, other)
    _assert_same(full_state(other), full_state(model), "Qwen3-MoE imported into EP")
    return True


def dtypes_round_trip(path: str) -> bool:
    """Parameters of every storable dtype (bfloat16 included: NumPy has none) come back exactly, dtype kept."""
    p = get_platform()
    base = moe.GroupedExperts.__bases__[1]  # the framework's module base

    class Mixed(base):
        def __init__(self, seed: int):
            super().__init__()
            rng = np.random.RandomState(seed)
            for dtype in ("float16", "bfloat16", "float32", "float64"):
                setattr(self, f"w_{dtype}", p.Parameter(p.tensor(rng.randn(3, 2).astype(np.float32), dtype=dtype)))
            self.i32 = p.Parameter(p.tensor(rng.randint(0, 99, (4,)), dtype="int32"), requires_grad=False)
            self.i64 = p.Parameter(p.tensor(rng.randint(0, 99, (4,)), dtype="int64"), requires_grad=False)
            self.flag = p.Parameter(p.tensor(rng.rand(3) > 0.5, dtype="bool"), requires_grad=False)

    saved, loaded = Mixed(0), Mixed(1)
    checkpoint.save(path, saved)
    checkpoint.load(path, loaded)
    for (name, a), (_, b) in zip(p.named_parameters(saved), p.named_parameters(loaded)):
        assert p.dtype_name(a.dtype) == p.dtype_name(b.dtype), name
        np.testing.assert_array_equal(p.to_numpy(b), p.to_numpy(a), err_msg=name)
    return True


# ---------------------------------------------------------------------------------------------- resume exactness
def train_steps(layout: str, first: int, last: int, load_from: str | None = None, save_to: str | None = None) -> dict:
    """AdamW steps ``first .. last - 1`` at ``layout`` (loading ``load_from`` first, saving to ``save_to`` after);
    returns each step's loss and the final parameters."""
    model = build(layout, seed=0 if load_from is None else 1)
    trainer = _Trainer(model, layout)
    if load_from is not None:
        assert checkpoint.load(load_from, model, trainer.opt) == {"step": first}
    losses = [trainer.step(step) for step in range(first, last)]
    if save_to is not None:
        checkpoint.save(save_to, model, trainer.opt, extra={"step": last})
    return {"losses": losses, "full": full_state(model)}
