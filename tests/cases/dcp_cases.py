"""torch.distributed.checkpoint (DCP) on parallelized MoE models (torch only): what a model saves, another model
with different weights and the same layout (or, resharding, another world size) loads exactly; each rank gets its
own shards back (issue 11: plain local shards came back from one rank everywhere)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor as TorchDTensor
from torch.distributed.tensor import Shard as TorchShard

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    Replicate,
    Shard,
    StridedShard,
    distribute_parameter,
    full_parameter,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    named_parameter_specs,
)
from hyper_parallel.dtensor.placement import strided_indices
from hyper_parallel.moe import MoE
from tests.cases.dtensor_cases import _host, _t, np_local
from tests.cases.moe_cases import D, E, H, K, T

UNEVEN_ROWS = 6  # over 4 ranks: 2, 2, 2, 0 rows (torch.chunk), the last rank's shard is empty


def _style_mesh(style: str):
    world = get_platform().get_world_size()
    if style == "ep":
        return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    if style == "etp":
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
    raise ValueError(f"style must be 'ep' or 'etp', got {style!r}")


def build(style: str, seed: int):
    """A MoE with a shared expert, weights from ``seed``, its experts parallelized by ``style`` on the world."""
    moe = MoE(dim=D, hidden_dim=H, num_experts=E, top_k=K, num_shared_experts=1, init_std=0.5, seed=seed)
    mesh = _style_mesh(style)
    (ExpertParallel() if style == "ep" else ExpertTensorParallel()).apply(moe.experts, mesh)
    return moe


def build_uneven(seed: int):
    """A module whose weight's 6 rows are sharded over the world with torch.chunk sizes (uneven on 4 ranks)."""
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, UNEVEN_ROWS, bias=False)
    mesh = init_device_mesh("cpu", (get_platform().get_world_size(),), mesh_dim_names=("dp",))
    distribute_parameter(module, "weight", mesh, [Shard(0)])
    return module


def _input(style: str) -> np.ndarray:
    p = get_platform()
    # ETP: the ranks of one tp line must hold the same tokens (mesh (2, world/2), row-major: the ep coordinate)
    data_id = p.get_rank() // (p.get_world_size() // 2) if style == "etp" else p.get_rank()
    return np.random.RandomState(11 + data_id).randn(T, D)


def full_parameters(model) -> dict[str, np.ndarray]:
    """Every parameter's full tensor on the host (every rank must call it: sharded ones are all-gathered)."""
    return {name: _host(full_parameter(q) if spec is not None else q) for name, q, spec in
            named_parameter_specs(model)}


def _assert_same_full(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), f"{what}: parameter names {list(got)} != {list(want)}"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


def _assert_differ(a: dict, b: dict, what: str) -> None:
    # the load must have something to do: the second model starts from other weights
    assert any(not np.array_equal(a[n], b[n]) for n in a), f"{what}: the two models start with the same weights"


def _assert_own_shards(model, full: dict, what: str) -> None:
    """Each rank holds ITS shard of the full tensor, and shards of different coordinates differ across ranks."""
    p = get_platform()
    for name, q, spec in named_parameter_specs(model):
        if spec is None:
            continue
        want = np_local(full[name], spec.device_mesh, spec.placements)
        np.testing.assert_array_equal(_host(q), want, err_msg=f"{what}: rank {p.get_rank()}'s shard of {name}")
    # the failure of issue 11 was one shard on every rank: compare the ranks' expert shards directly (every rank has
    # its own coordinate on these meshes, hence its own piece of w1)
    shards = _host(p.all_gather_into_tensor(model.experts.w1.detach().reshape(1, -1)))
    for r in range(len(shards)):
        for s in range(r):
            assert not np.array_equal(shards[r], shards[s]), f"{what}: ranks {s} and {r} hold the same w1 shard"


def _sharded_entries_are_dtensors(model, sd: dict) -> list[str]:
    sharded = [name for name, _, spec in named_parameter_specs(model) if spec is not None]
    for name in sharded:
        assert isinstance(sd[name], TorchDTensor), f"state_dict()[{name!r}] is a {type(sd[name]).__name__}"
    for name, value in sd.items():
        if name not in sharded:
            assert not isinstance(value, TorchDTensor), f"state_dict()[{name!r}] should stay a plain tensor"
    return sharded


def save_and_load(style: str, path: str, api: str = "module") -> bool:
    """Save a model with DCP, load it into a model with other weights and the same layout, compare exactly.

    ``api="module"`` hands DCP ``model.state_dict()`` and loads back with ``load_state_dict``; ``api="dcp"`` uses
    DCP's own ``get_model_state_dict`` / ``set_model_state_dict`` (which call those underneath)."""
    p = get_platform()
    what = f"DCP {style} x{p.get_world_size()} rank {p.get_rank()} via {api} state dicts"
    x = _t(_input(style))
    saved = build(style, seed=0)
    sd = saved.state_dict() if api == "module" else get_model_state_dict(saved)
    sharded = _sharded_entries_are_dtensors(saved, sd)
    for name in sharded:  # no copy: the DTensor's local tensor is the parameter's storage
        param = saved.get_parameter(name)
        assert sd[name].to_local().data_ptr() == param.data_ptr(), f"{what}: {name} copied"
        assert tuple(sd[name].shape) == get_parameter_spec(param).shape, f"{what}: {name} global shape"
    dcp.save(sd, checkpoint_id=path)
    want = full_parameters(saved)
    want_out = _host(saved(x))

    loaded = build(style, seed=1)
    _assert_differ(full_parameters(loaded), want, what)
    target = loaded.state_dict() if api == "module" else get_model_state_dict(loaded)
    dcp.load(target, checkpoint_id=path)  # writes into the DTensors' local tensors: the parameters themselves
    _assert_same_full(full_parameters(loaded), want, what + " after dcp.load alone")
    # the usual follow-up: a no-op here, and it must accept the DTensors
    if api == "module":
        loaded.load_state_dict(target)
    else:
        set_model_state_dict(loaded, target)
    _assert_same_full(full_parameters(loaded), want, what + " after load_state_dict")
    np.testing.assert_array_equal(_host(loaded(x)), want_out, err_msg=what + " output")
    _assert_own_shards(loaded, want, what)
    return True


def plain_shards_lose_data(path: str) -> bool:
    """Issue 11 itself, kept as evidence that the per-rank checks catch it: local shards handed to DCP as plain
    tensors are taken for replicated ones, and one rank's shard comes back on every rank."""
    p = get_platform()
    saved = build("ep", seed=0)
    want = full_parameters(saved)
    dcp.save({k: v.to_local() if isinstance(v, TorchDTensor) else v for k, v in saved.state_dict().items()},
             checkpoint_id=path)
    loaded = build("ep", seed=1)
    plain = {k: v.to_local() if isinstance(v, TorchDTensor) else v for k, v in loaded.state_dict().items()}
    dcp.load(plain, checkpoint_id=path)
    shards = _host(p.all_gather_into_tensor(loaded.experts.w1.detach().reshape(1, -1)))
    assert all(np.array_equal(shards[0], s) for s in shards), "expected one rank's w1 shard on every rank"
    assert not np.array_equal(_host(full_parameter(loaded.experts.w1)), want["experts.w1"])
    return True


def state_dict_round_trips(style: str) -> bool:
    """``torch.save(model.state_dict())``, ``torch.load``, ``load_state_dict`` in the same world; plain local
    shards still load; a DTensor laid out differently is refused."""
    p = get_platform()
    what = f"state_dict {style} x{p.get_world_size()} rank {p.get_rank()}"
    saved = build(style, seed=0)
    want = full_parameters(saved)
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)  # weights_only: torch allows DTensors and their meshes
    _sharded_entries_are_dtensors(saved, sd)
    loaded = build(style, seed=1)
    _assert_differ(full_parameters(loaded), want, what)
    loaded.load_state_dict(sd)
    _assert_same_full(full_parameters(loaded), want, what + " from torch.load")
    _assert_own_shards(loaded, want, what)

    # plain local shards (what state_dict held before the DTensors) load as they always did
    again = build(style, seed=1)
    again.load_state_dict({k: v.to_local() if isinstance(v, TorchDTensor) else v for k, v in sd.items()})
    _assert_same_full(full_parameters(again), want, what + " from plain local shards")

    # a DTensor of another layout: copying its local shard would be wrong, so it is refused
    other = build("etp" if style == "ep" else "ep", seed=0)
    try:
        loaded.load_state_dict(other.state_dict())
    except ValueError as e:
        assert "cannot reshard" in str(e) and "experts.w1" in str(e), str(e)
    else:
        raise AssertionError(f"{what}: a state dict of another layout was loaded")
    _assert_same_full(full_parameters(loaded), want, what + " after the refused load")
    return True


def save_for_resharding(path: str) -> dict[str, np.ndarray]:
    """Save an EP model and an unevenly sharded module; return their full tensors for the loading world."""
    ep, uneven = build("ep", seed=0), build_uneven(seed=0)
    dcp.save({"moe": ep.state_dict(), "uneven": uneven.state_dict()}, checkpoint_id=path)
    return {**{f"moe.{k}": v for k, v in full_parameters(ep).items()},
            **{f"uneven.{k}": v for k, v in full_parameters(uneven).items()}}


def load_resharded(path: str, want: dict[str, np.ndarray]) -> bool:
    """Load what :func:`save_for_resharding` saved on another world size: the full tensors are equal."""
    p = get_platform()
    what = f"DCP resharded into x{p.get_world_size()} rank {p.get_rank()}"
    ep, uneven = build("ep", seed=1), build_uneven(seed=1)
    before = {**{f"moe.{k}": v for k, v in full_parameters(ep).items()},
              **{f"uneven.{k}": v for k, v in full_parameters(uneven).items()}}
    _assert_differ(before, want, what)
    target = {"moe": ep.state_dict(), "uneven": uneven.state_dict()}
    dcp.load(target, checkpoint_id=path)
    ep.load_state_dict(target["moe"])
    uneven.load_state_dict(target["uneven"])
    got = {**{f"moe.{k}": v for k, v in full_parameters(ep).items()},
           **{f"uneven.{k}": v for k, v in full_parameters(uneven).items()}}
    _assert_same_full(got, want, what)
    _assert_own_shards(ep, {k.removeprefix("moe."): v for k, v in want.items() if k.startswith("moe.")}, what)
    return True


def uneven_save_and_load(path: str) -> bool:
    """Uneven shards (torch.chunk sizes, an empty one on 4 ranks) in the same world."""
    p = get_platform()
    saved = build_uneven(seed=0)
    sizes = p.tolist(p.all_gather_into_tensor(p.tensor([saved.weight.shape[0]], dtype="int64")))
    assert sizes == ([2, 2, 2, 0] if p.get_world_size() == 4 else [3, 3]), sizes
    want = full_parameters(saved)
    dcp.save(saved.state_dict(), checkpoint_id=path)
    loaded = build_uneven(seed=1)
    _assert_differ(full_parameters(loaded), want, "uneven")
    dcp.load(loaded.state_dict(), checkpoint_id=path)
    _assert_same_full(full_parameters(loaded), want, f"uneven rank {p.get_rank()}")
    return True


# ------------------------------------------------------------------------------------------------ StridedShard
def _strided_module(style: str, seed: int):
    """A module whose fused ``[E, 2H, D]`` weight (``[gate; up]`` along dim 1) is laid out for tensor parallelism
    with ``StridedShard(1, 2)``: on a 1-D "tp" mesh, or ``[Shard(0), StridedShard(1, 2)]`` on ("ep", "tp")."""
    world = get_platform().get_world_size()
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 3, bias=True)
    module.weight = torch.nn.Parameter(torch.randn(4, 4 * world, 3))
    if style == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        placements = [StridedShard(1, 2)]
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
        placements = [Shard(0), StridedShard(1, 2)]
    distribute_parameter(module, "weight", mesh, placements)
    distribute_parameter(module, "bias", mesh, [Replicate()] * mesh.ndim)
    return module, mesh, placements


def strided_state_dict_refused(style: str, path: str) -> bool:
    """``state_dict`` refuses a StridedShard parameter (DCP cannot express it) instead of returning a checkpoint
    that would be wrong; nothing is saved. Loading still works where it is exact: plain local shards, and a torch
    DTensor with the same ``_StridedShard`` layout (a local copy)."""
    import os

    from torch.distributed.tensor.placement_types import _StridedShard

    from hyper_parallel.integrations.torch_dcp import torch_device_mesh

    module, mesh, placements = _strided_module(style, seed=0)
    for save in (lambda: dcp.save(module.state_dict(), checkpoint_id=path),
                 lambda: dcp.save(get_model_state_dict(module), checkpoint_id=path)):
        try:
            save()
        except ValueError as e:
            msg = str(e)
            for part in ("state_dict: weight:", "torch.distributed.checkpoint cannot express this layout",
                         "StridedShard(dim=1, split_factor=2) on mesh axis 'tp'", "Supported in state_dict: Shard"):
                assert part in msg, f"{part!r} not in {msg!r}"
        else:
            raise AssertionError("state_dict() of a StridedShard parameter did not raise")
    assert not os.path.exists(path), "a checkpoint was written"

    want = _host(full_parameter(module.weight))
    other, _, _ = _strided_module(style, seed=1)
    assert not np.array_equal(_host(full_parameter(other.weight)), want)
    other.load_state_dict({"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()})
    np.testing.assert_array_equal(_host(full_parameter(other.weight)), want, err_msg="plain local shards")
    third, _, _ = _strided_module(style, seed=2)
    theirs = [_StridedShard(1, split_factor=2) if pl.is_strided_shard() else TorchShard(pl.dim) for pl in placements]
    value = TorchDTensor.from_local(module.weight.detach().clone(), torch_device_mesh(mesh, "cpu"), theirs,
                                    run_check=False, shape=torch.Size(want.shape),
                                    stride=torch.empty(want.shape).stride())
    third.load_state_dict({"weight": value, "bias": module.bias.detach().clone()})
    np.testing.assert_array_equal(_host(full_parameter(third.weight)), want, err_msg="same-layout torch DTensor")
    return True


def torch_misplaces_strided_shards() -> bool:
    """Why state_dict refuses StridedShard: torch describes a ``_StridedShard`` shard to DCP as ONE block (this
    rank's size at its FIRST row's offset), which is not the rows the rank holds. If a torch release fixes this,
    this check fails: then state_dict may map StridedShard to ``_StridedShard`` for DCP."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    from hyper_parallel.integrations.torch_dcp import torch_device_mesh

    world = get_platform().get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = 4 * world
    local_rows, offset = compute_local_shape_and_global_offset((rows, 2), torch_device_mesh(mesh, "cpu"),
                                                               [_StridedShard(0, split_factor=2)])
    described = list(range(offset[0], offset[0] + local_rows[0]))
    held = strided_indices(rows, 2, world, mesh.get_local_rank())
    assert len(described) == len(held) and described != held, (described, held)
    return True
