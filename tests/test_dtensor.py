"""DeviceMesh / DTensor / parallel styles on every backend, at 2 and 4 ranks, 1-D and 2x2 meshes."""

from __future__ import annotations

import itertools

import pytest

from tests.cases import dtensor_cases as d

ONE_D = [(s, t) for s, t in itertools.product(["S0", "S1", "R", "P"], ["S0", "S1", "R"]) if s != t]


def _two_d_pairs():
    """Each 1-D transition on axis 0 and on axis 1 of a 2x2 mesh, the other axis fixed, plus two-axis moves."""
    pairs = []
    for axis, (s, t) in itertools.product((0, 1), ONE_D):
        for other in ("R", "S0", "S1", "P"):
            if other[0] == "S" and other in (s, t):
                continue  # one tensor dim is sharded on one mesh axis only
            src, dst = [other, other], [other, other]
            src[axis], dst[axis] = s, t
            if "P" in dst:
                continue
            pairs.append((tuple(src), tuple(dst)))
    pairs += [(("S0", "S1"), ("S1", "S0")), (("P", "P"), ("R", "R")), (("P", "S1"), ("S0", "R")),
              (("S0", "S1"), ("R", "R")), (("R", "R"), ("S1", "S0"))]
    return pairs


SHAPES = [(8, 4), (7, 6), (5, 3)]  # even; uneven (7 rows over 4 ranks); a rank with an empty shard (5 over 4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("nproc", [2, 4])
def test_redistribute_1d(worlds, backend, nproc, shape):
    pairs = [((s,), (t,)) for s, t in ONE_D]
    assert worlds.run(backend, nproc, d.redistribute_pairs, (nproc,), shape, pairs)[0] == len(pairs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_redistribute_2x2(worlds, backend, shape):
    pairs = _two_d_pairs()
    assert worlds.run(backend, 4, d.redistribute_pairs, (2, 2), shape, pairs)[0] == len(pairs)


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_distribute_tensor_and_full_tensor(worlds, backend, mesh_shape):
    nproc = 1
    for s in mesh_shape:
        nproc *= s
    worlds.run(backend, nproc, d.full_tensor_and_distribute, mesh_shape, (7, 5))


@pytest.mark.parametrize("nproc", [2, 4])
def test_to_local_with_partial_gradient(worlds, backend, nproc):
    worlds.run(backend, nproc, d.to_local_partial_gradient)


def test_device_mesh(worlds, backend):
    worlds.run(backend, 4, d.mesh_api)


@pytest.mark.parametrize("nproc", [2, 4])
def test_errors(worlds, backend, nproc):
    worlds.run(backend, nproc, d.dtensor_errors)


@pytest.mark.parametrize("hidden", [8, 7], ids=["even", "uneven"])
@pytest.mark.parametrize("nproc", [2, 4])
def test_mlp_colwise_rowwise_matches_single_device(worlds, backend, nproc, hidden):
    worlds.run(backend, nproc, d.mlp_colwise_rowwise, hidden)


@pytest.mark.parametrize("nproc", [2, 4])
def test_prepare_module_input_output_and_sequence_parallel_layouts(worlds, backend, nproc):
    worlds.run(backend, nproc, d.prepare_input_output_and_layouts)


def test_mesh_from_nested_lists_and_more_errors(worlds, backend):
    worlds.run(backend, 4, d.mesh_from_nested_lists)


# ------------------------------------------------------------------------------------------------ StridedShard
STRIDED_ONE_D = [(s, t) for s, t in itertools.product(["SS0", "SS1", "S0", "S1", "R", "P"],
                                                      ["SS0", "SS1", "S0", "S1", "R"]) if s != t and "SS" in s + t]
# dims divisible by split_factor * axis size for every case below (2 or 3 times 2 or 4); 7 columns are uneven for
# Shard(1) next to StridedShard(0)
STRIDED_SHAPES = [(24, 24), (24, 7)]


def _strided_pairs(pairs, shape):
    return [(s, t) for s, t in pairs if shape[1] % 24 == 0 or "SS1" not in s + t]


@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split_factor", [2, 3])
@pytest.mark.parametrize("nproc", [2, 4])
def test_strided_shard_redistribute_1d(worlds, backend, nproc, split_factor, shape):
    pairs = _strided_pairs([((s,), (t,)) for s, t in STRIDED_ONE_D], shape)
    assert worlds.run(backend, nproc, d.redistribute_pairs, (nproc,), shape, pairs, split_factor)[0] == len(pairs)


def _strided_two_d_pairs():
    """Each 1-D StridedShard transition on axis 0 and on axis 1 of a 2x2 mesh, the other axis fixed, plus two-axis
    moves around the expert-tensor-parallel layout ``[Shard(0), StridedShard(1, s)]``."""
    pairs = []
    for axis, (s, t) in itertools.product((0, 1), STRIDED_ONE_D):
        for other in ("R", "S0", "S1", "SS0", "SS1"):
            if other != "R" and other[-1] in (s[-1] if s[0] == "S" else "", t[-1] if t[0] == "S" else ""):
                continue  # one tensor dim is sharded on one mesh axis only
            src, dst = [other, other], [other, other]
            src[axis], dst[axis] = s, t
            pairs.append((tuple(src), tuple(dst)))
    pairs += [(("S0", "SS1"), ("R", "R")), (("R", "R"), ("S0", "SS1")), (("S0", "SS1"), ("SS1", "S0")),
              (("SS0", "S1"), ("S1", "SS0")), (("P", "P"), ("S0", "SS1")), (("SS0", "SS1"), ("SS1", "SS0")),
              (("S0", "SS1"), ("S0", "S1")), (("S0", "S1"), ("S0", "SS1")), (("S0", "SS1"), ("SS0", "S1"))]
    return pairs


@pytest.mark.parametrize("shape", STRIDED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split_factor", [2, 3])
def test_strided_shard_redistribute_2x2(worlds, backend, split_factor, shape):
    pairs = _strided_pairs(_strided_two_d_pairs(), shape)
    assert worlds.run(backend, 4, d.redistribute_pairs, (2, 2), shape, pairs, split_factor)[0] == len(pairs)


@pytest.mark.parametrize("split_factor", [2, 3])
@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_strided_shard_distribute_and_full_tensor(worlds, backend, mesh_shape, split_factor):
    nproc = 1
    for s in mesh_shape:
        nproc *= s
    worlds.run(backend, nproc, d.strided_full_tensor_and_distribute, mesh_shape, (24, 24), split_factor)


@pytest.mark.parametrize("split_factor", [2, 3])
@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_strided_shard_fused_gate_up_parameter(worlds, backend, mesh_shape, split_factor):
    nproc = 1
    for s in mesh_shape:
        nproc *= s
    worlds.run(backend, nproc, d.strided_fused_gate_up, mesh_shape, split_factor)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("split_factor", [2, 3])
@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_strided_shard_matches_torch_strided_shard(worlds, backend, mesh_shape, split_factor):
    nproc = 1
    for s in mesh_shape:
        nproc *= s
    worlds.run(backend, nproc, d.strided_matches_torch, mesh_shape, split_factor)


@pytest.mark.parametrize("nproc", [2, 4])
def test_strided_shard_errors(worlds, backend, nproc):
    worlds.run(backend, nproc, d.strided_errors)
