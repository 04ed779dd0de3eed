"""hyper_parallel.checkpoint: save at one layout, load at another (EP 4 -> EP 2 -> ETP 2x2 -> one process -> EP 4,
fused StridedShard weights), the optimizer state resharded and resumed, the other framework, crashes during a save,
bad loads; the file format against the safetensors library."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hyper_parallel import Partial, Replicate, Shard, StridedShard
from hyper_parallel.checkpoint import read_index
from hyper_parallel.checkpoint._layout import layout_boxes
from hyper_parallel.checkpoint._safetensors import SafetensorsFile, write_safetensors
from hyper_parallel.dtensor.placement import strided_indices
from tests.cases import checkpoint_cases as cc

# the NPU adapter's logic adds nothing here: it inherits the torch adapter's host copies
pytestmark = pytest.mark.backends("torch", "mindspore")


def _index(path) -> dict:
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- in this process
def test_files_are_safetensors_both_ways(tmp_path):
    stn = pytest.importorskip("safetensors.numpy")
    rng = np.random.RandomState(0)
    arrays = {"a": rng.randn(3, 4).astype(np.float32), "b": np.arange(5, dtype=np.int64),
              "c": rng.randn(2, 2).astype(np.float16), "d": np.array(2.5), "e": np.array([True, False])}
    ours = str(tmp_path / "ours.safetensors")
    write_safetensors(ours, [(k, str(v.dtype), v.shape, lambda v=v: v)
                             for k, v in arrays.items()], {"who": "test"})
    theirs = stn.load_file(ours)
    assert sorted(theirs) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(theirs[k], v)
        assert theirs[k].dtype == v.dtype
    library = str(tmp_path / "library.safetensors")
    stn.save_file(arrays, library, metadata={"x": "y"})
    f = SafetensorsFile(library)
    assert f.metadata == {"x": "y"}
    for k, v in arrays.items():
        np.testing.assert_array_equal(f.read(k), v)
    np.testing.assert_array_equal(f.read("a", (slice(1, 3), slice(0, 4, 2))), arrays["a"][1:3, 0:4:2])
    # bfloat16 (NumPy has none: float32 in memory, the upper half of each float32 in the file)
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    bf = torch.randn(4, 3).to(torch.bfloat16)
    path = str(tmp_path / "bf16.safetensors")
    write_safetensors(path, [("w", "bfloat16", (4, 3), lambda: bf.float().numpy())])
    assert torch.equal(load_file(path)["w"], bf)
    np.testing.assert_array_equal(SafetensorsFile(path).read("w"), bf.float().numpy())
    # damaged files are named
    with open(library, "r+b") as fh:
        fh.truncate(os.path.getsize(library) - 4)
    with pytest.raises(ValueError, match=r"library.safetensors: truncated: its header describes \d+ bytes"):
        SafetensorsFile(library)


def test_boxes_of_each_placement():
    # StridedShard(1, 2) of 8 rows over 2 ranks: rank 1 holds rows 2-3 and 6-7, as two boxes
    local, boxes = layout_boxes((4, 8), (2,), (1,), [StridedShard(1, 2)])
    assert local == (4, 4)
    assert [(b.offsets, b.lengths, b.local) for b in boxes] == [((0, 2), (4, 2), (0, 0)), ((0, 6), (4, 2), (0, 2))]
    rows = [b.offsets[1] + i for b in boxes for i in range(b.lengths[1])]
    assert rows == strided_indices(8, 2, 2, 1)
    # expert-tensor parallel: Shard(0) on ep, StridedShard on tp
    local, boxes = layout_boxes((4, 8, 3), (2, 2), (1, 0), [Shard(0), StridedShard(1, 2)])
    assert local == (2, 4, 3) and [b.offsets for b in boxes] == [(2, 0, 0), (2, 4, 0)]
    # uneven torch.chunk shards: the last of 4 ranks holds nothing of 6 rows
    assert layout_boxes((6, 2), (4,), (3,), [Shard(0)]) == ((0, 2), [])
    assert layout_boxes((5,), (2, 2), (1, 1), [Replicate(), Replicate()])[1][0].lengths == (5,)


# ---------------------------------------------------------------------------------------------- across layouts
def test_round_trip_ep4_ep2_etp_one_process_and_back(worlds, backend, tmp_path):
    c = [str(tmp_path / f"c{i}") for i in range(4)]
    first = worlds.run(backend, 4, cc.first_save, "ep", c[0])
    want = first[0]["full"]
    index = _index(c[0])
    assert index["world_size"] == 4 and sorted(index["files"]) == [f"rank{r:05d}.safetensors" for r in range(4)]
    w1 = index["tensors"]["model/experts.w1"]
    assert w1["shape"] == [cc.E, cc.H, cc.D] and w1["kind"] == "sharded"
    assert [(q["file"], q["offsets"]) for q in w1["pieces"]] == [
        (f"rank{r:05d}.safetensors", [r, 0, 0]) for r in range(4)]
    for name in ("model/router.gate", "model/expert_bias", "model/shared_experts.w1"):  # written once, by rank 0
        assert [q["file"] for q in index["tensors"][name]["pieces"]] == ["rank00000.safetensors"], name
    assert index["tensors"]["model/tokens_per_expert"]["shape"] == [4, cc.E]
    assert [e["rank"] for e in index["extra"]] == [0, 1, 2, 3]

    counts = [r["counts"] for r in first]
    assert any(a != b for a in counts for b in counts), "the ranks' counts should differ"
    steps = [("ep", 2, c[0], c[1]), ("etp", 4, c[1], c[2]), ("one", 1, c[2], c[3]), ("ep", 4, c[3], None)]
    for layout, nproc, src, dst in steps:
        out = worlds.run(backend, nproc, cc.load_check_save, layout, src, want, counts, dst)
        counts = [r["counts"] for r in out]
        for r in out:
            for name, value in want.items():
                np.testing.assert_array_equal(r["full"][name], value, err_msg=f"{layout} x{nproc}: {name}")
    etp = _index(c[2])["tensors"]["model/experts.w1"]  # written at ETP 2x2: four (expert, hidden) blocks
    assert sorted((q["offsets"], q["lengths"]) for q in etp["pieces"]) == [
        ([e, h, 0], [2, 4, cc.D]) for e in (0, 2) for h in (0, 4)]


def test_fused_strided_shard_weights(worlds, backend, tmp_path):
    c = [str(tmp_path / f"c{i}") for i in range(3)]
    want = worlds.run(backend, 4, cc.fused_save, c[0])[0]
    gate_up = _index(c[0])["tensors"]["model/gate_up"]
    # [G, D, 2H] under [Shard(0), StridedShard(2, 2)] on 2 x 2: each rank writes a block of each half
    assert gate_up["layout"].startswith("Shard(dim=0), StridedShard(dim=2, split_factor=2)")
    assert len(gate_up["pieces"]) == 8 and {tuple(q["lengths"]) for q in gate_up["pieces"]} == {(4, 6, 2)}
    worlds.run(backend, 2, cc.fused_load, "tp", c[0], want, c[1])
    worlds.run(backend, 4, cc.fused_load, "ep", c[1], want, c[2])
    worlds.run(backend, 1, cc.fused_load, "one", c[2], want, None)


def test_every_dtype_round_trips(worlds, backend, tmp_path):
    worlds.run(backend, 1, cc.dtypes_round_trip, str(tmp_path / "ckpt"))


# ---------------------------------------------------------------------------------------------- optimizer state
def test_optimizer_state_resharded_and_resumed(worlds, backend, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = worlds.run(backend, 2, cc.train_save_step, "ep", path)[0]
    assert {k.rsplit("/", 1)[1] for k in saved["opt"]} == {"exp_avg", "exp_avg_sq", "step"}
    assert all(v == 2 for k, v in saved["opt"].items() if k.endswith("/step"))
    worlds.run(backend, 2, cc.load_resume, "ep", path, saved, "exact")  # the next step equals, bit for bit
    worlds.run(backend, 4, cc.load_resume, "etp", path, saved, None)    # the state resharded to ETP 2x2
    worlds.run(backend, 1, cc.load_resume, "one", path, saved, "close")  # one process: the same step up to fp32


# ---------------------------------------------------------------------------------------------- faults
def test_a_crash_during_save_leaves_the_previous_checkpoint(worlds, backend, tmp_path):
    path = str(tmp_path / "run" / "ckpt")
    worlds.run(backend, 2, cc.crash_during_save_keeps_the_previous, path)
    # a crash between the two renames of the swap: the previous checkpoint is complete next to the path
    os.rename(path, str(tmp_path / "run" / ".ckpt.previous"))
    with pytest.raises(ValueError, match=r"no checkpoint at .*ckpt \(no index.json\); a save was interrupted while "
                                         r"replacing it: the previous checkpoint is complete at .*\.ckpt\.previous"):
        read_index(path)


def test_bad_loads_name_what_does_not_fit(worlds, backend, tmp_path):
    worlds.run(backend, 2, cc.bad_loads, str(tmp_path / "ckpt"))


@pytest.mark.parametrize("resume_layout,nproc", [("ep", 4), ("one", 1), ("etp", 4)])
def test_resume_at_another_layout_continues_the_same_run(worlds, backend, tmp_path, resume_layout, nproc):
    """6 AdamW steps straight at EP 2 against 3 steps, save, load at another layout, 3 more: every step's loss and
    the final parameters within 1e-6 relative (fp32: the layouts sum in other orders)."""
    path = str(tmp_path / "ckpt")
    straight = worlds.run(backend, 2, cc.train_steps, "ep", 0, 6)[0]
    first = worlds.run(backend, 2, cc.train_steps, "ep", 0, 3, None, path)[0]
    second = worlds.run(backend, nproc, cc.train_steps, resume_layout, 3, 6, path)[0]
    losses = first["losses"] + second["losses"]
    for step, (got, want) in enumerate(zip(losses, straight["losses"])):
        assert abs(got - want) <= 1e-6 * abs(want), f"step {step}: loss {got} != {want} (straight run)"
    for name, want in straight["full"].items():
        cc.assert_rel(second["full"][name].astype(np.float64), want.astype(np.float64), f"final {name}", tol=1e-6)


# ---------------------------------------------------------------------------------------------- across frameworks
def test_torch_to_mindspore_and_back(worlds, tmp_path):
    """Runs in the MindSpore pass of ci/test.sh (its name holds "mindspore"); needs both frameworks installed, as
    the test environment has them."""
    c = [str(tmp_path / f"c{i}") for i in range(2)]
    saved = worlds.run("torch", 2, cc.train_save_step, "ep", c[0])[0]  # torch AdamW, EP 2
    assert _index(c[0])["framework"] == "torch"
    ms = worlds.run("mindspore", 4, cc.cross_framework_load, "ep", c[0], saved, c[1])  # AdamWeightDecay, EP 4
    assert _index(c[1])["framework"] == "mindspore"
    back = worlds.run("torch", 1, cc.cross_framework_load, "one", c[1], saved, None)
    cc.assert_rel(ms[0]["out"], back[0]["out"], "MindSpore's output against torch's", tol=1e-5)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("max_shard_bytes", [None, 1000])
def test_export_for_inference_and_import(worlds, backend, tmp_path, max_shard_bytes):
    stn = pytest.importorskip("safetensors.numpy")
    out = str(tmp_path / "exported")
    result = worlds.run(backend, 4, cc.export_model, "ep", out, max_shard_bytes)
    want, files = result[0]["full"], result[0]["files"]
    assert all(r["files"] == files for r in result)
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # the ranks' shards were removed
    if max_shard_bytes is None:
        assert files == ["model.safetensors"] and sorted(os.listdir(out)) == files
        weight_map = {name: "model.safetensors" for name in want}
    else:  # transformers' sharded layout: files of at most max_shard_bytes (unless one tensor is larger) + index
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(want)  # the model's own names; no per-rank load counts
    seen = {}
    for file in files:
        tensors = stn.load_file(os.path.join(out, file))  # the safetensors library reads it
        assert all(weight_map[name] == file for name in tensors)
        if max_shard_bytes is not None:
            assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= max_shard_bytes
        seen.update(tensors)
    assert SafetensorsFile(os.path.join(out, files[0])).metadata["format"] == "pt"  # what from_pretrained wants
    for name, value in want.items():
        np.testing.assert_array_equal(seen[name], value, err_msg=name)
    worlds.run(backend, 4, cc.import_export, "etp", out, want)  # imported into another layout
    worlds.run(backend, 1, cc.import_export, "one", out, want)


@pytest.mark.backends("torch")
def test_transformers_from_pretrained_loads_an_export(worlds, backend, tmp_path):
    pytest.importorskip("transformers")
    worlds.run(backend, 2, cc.transformers_export, str(tmp_path / "qwen3_moe"))


def test_errors_that_need_no_world(tmp_path):
    from hyper_parallel.checkpoint import _checkpoint, consolidate
    from hyper_parallel.checkpoint._optimizers import optimizer_adapter

    # a file that is not safetensors
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match=r"bad.safetensors: not a safetensors file \(2 bytes"):
        SafetensorsFile(str(bad))
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"not a safetensors file or truncated \(header of 1000000000 bytes"):
        SafetensorsFile(str(bad))
    bad.write_bytes((4).to_bytes(8, "little") + b"{x: ")
    with pytest.raises(ValueError, match=r"header is not valid JSON"):
        SafetensorsFile(str(bad))
    with pytest.raises(TypeError, match=r"dtype 'complex64' cannot be stored; supported: \['bool', 'int32'"):
        write_safetensors(str(bad), [("x", "complex64", (1,), lambda: np.zeros(1))])
    # an index of another version, or no index
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "index.json").write_text(json.dumps({"format": "hyper_parallel.checkpoint", "version": 99}))
    with pytest.raises(ValueError, match=r"has version 99; this code reads version 1"):
        read_index(ckpt)
    (ckpt / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"is not a hyper_parallel.checkpoint index"):
        read_index(ckpt)
    with pytest.raises(ValueError, match=r"max_shard_bytes must be a positive int or None, got 0"):
        consolidate(ckpt, tmp_path / "out", max_shard_bytes=0)
    # pieces that leave a gap, overlap, or lie outside the tensor
    entry = {"shape": [4, 2], "pieces": [{"offsets": [0, 0], "lengths": [2, 2]}]}
    with pytest.raises(ValueError, match=r"the ranks' blocks of w cover 4 of its 8 elements"):
        _checkpoint._check_tiling("w", entry)
    entry["pieces"].append({"offsets": [1, 0], "lengths": [3, 2]})
    with pytest.raises(ValueError, match=r"blocks of w at \[1, 0\] and \[0, 0\] overlap"):
        _checkpoint._check_tiling("w", entry)
    entry["pieces"] = [{"offsets": [3, 0], "lengths": [2, 2]}]
    with pytest.raises(ValueError, match=r"a block of w at \[3, 0\] of \[2, 2\] lies outside its shape \[4, 2\]"):
        _checkpoint._check_tiling("w", entry)
    # what save refuses before writing anything
    with pytest.raises(TypeError, match=r"extra must be a dict \(JSON-serialisable\) or None, got list"):
        _checkpoint._check_extra([1])
    with pytest.raises(TypeError, match=r"cannot read the state of a builtins.object; supported: \['torch.optim"):
        optimizer_adapter(object())
    with pytest.raises(ValueError, match=r"Partial\(reduce_op='sum'\) on mesh axis 0; a checkpoint stores values"):
        layout_boxes((4,), (2,), (0,), [Partial()])
