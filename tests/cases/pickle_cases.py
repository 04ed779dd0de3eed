"""Round trips of MoE models through pickle, copy.deepcopy and (torch) torch.save: the loaded model is a separate
model that computes exactly what the original computes, forward and backward, on every rank."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    named_parameter_specs,
)
from hyper_parallel.expert_parallel.sequence_parallel import ReordererSequenceParallel
from tests.cases.dtensor_cases import _host, _t
from tests.cases.moe_cases import D, T, make_moe


def parallelized(style: str):
    """A MoE with shared experts and the expert bias, under ``style`` on the whole world."""
    p = get_platform()
    moe = make_moe("shared")
    world = p.get_world_size()
    if style == "ep+sp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        ExpertParallel().apply(moe.experts, mesh)
        ReordererSequenceParallel().apply(moe.reorderer, mesh)
    elif style == "etp":
        ExpertTensorParallel().apply(moe.experts, init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp")))
    elif style != "none":
        raise ValueError(style)
    return moe


def _run(moe, x, w):
    p = get_platform()
    params = [q for _, q in p.named_parameters(moe) if q.requires_grad]
    _, (gx,), grads = p.value_and_grad(lambda t: (moe(t) * _t(w)).sum(), [_t(x)], params)
    return _host(moe(_t(x))), _host(gx), [_host(g) for g in grads]


def _round_trips(moe):
    p = get_platform()
    yield "pickle", pickle.loads(pickle.dumps(moe))
    yield "deepcopy", copy.deepcopy(moe)
    if p.name == "torch":
        import torch

        buf = io.BytesIO()
        torch.save(moe, buf)
        buf.seek(0)
        yield "torch.save", torch.load(buf, weights_only=False)


def round_trips_compute_the_same(style: str) -> bool:
    p = get_platform()
    # ETP: the ranks of one tp line must hold the same tokens (mesh (2, world/2), row-major: the ep coordinate)
    data_id = p.get_rank() // (p.get_world_size() // 2) if style == "etp" else p.get_rank()
    rng = np.random.RandomState(7 + data_id)
    x, w = rng.randn(T, D), rng.randn(T, D)
    moe = parallelized(style)
    want = _run(moe, x, w)
    names = [n for n, _ in p.named_parameters(moe)]
    for how, clone in _round_trips(moe):
        what = f"{how} of a {style} MoE, rank {p.get_rank()}"
        assert type(clone) is type(moe) and type(clone).__name__ == "MoE", what
        assert [n for n, _ in p.named_parameters(clone)] == names, what
        got = _run(clone, x, w)
        np.testing.assert_array_equal(got[0], want[0], err_msg=what + " output")
        np.testing.assert_array_equal(got[1], want[1], err_msg=what + " input grad")
        for name, a, b in zip(names, got[2], want[2]):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: grad of {name}")
        # the layouts travel with the modules; named_parameter_specs puts them back on the copied parameters
        for (name, q, spec), (cname, c, cspec) in zip(named_parameter_specs(moe), named_parameter_specs(clone)):
            assert name == cname and q is not c, f"{what}: {name} is shared with the original"
            assert (spec is None) == (cspec is None), f"{what}: {name} lost its layout"
            assert get_parameter_spec(c) is cspec, f"{what}: {name}'s cache was not restored"
            if spec is not None:
                assert (cspec.shape, cspec.placements, cspec.device_mesh) == (spec.shape, spec.placements,
                                                                             spec.device_mesh), what
                # the clone's mesh uses this process's groups (no new ones were created by loading)
                assert cspec.device_mesh.get_group(0) is spec.device_mesh.get_group(0), what
        # a separate model: changing the clone leaves the original alone
        p.replace_parameter(clone.experts, "w1", clone.experts.w1 * 0)
        np.testing.assert_array_equal(_host(moe(_t(x))), want[0], err_msg=what + " original after clone change")
    return True


def pickled_parallel_model() -> bytes:
    """The bytes of an EP model, for loading somewhere without its process groups."""
    return pickle.dumps(parallelized("ep+sp"))
