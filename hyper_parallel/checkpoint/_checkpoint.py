"""``save`` and ``load``: sharded checkpoints that reshard across layouts, world sizes and frameworks.

A checkpoint is a directory::

    index.json               what every tensor is (global shape, dtype) and where each block of it lies
    rank00000.safetensors    the blocks rank 0 wrote, one entry per block
    rank00001.safetensors    ...

Each rank writes the blocks of its local shards (no gather); a block several ranks hold (a replicated parameter, a
shard repeated over a data-parallel axis) is written once, by the lowest rank holding it. ``load`` intersects the
blocks each rank needs under the model's layout with the blocks saved, and reads only those bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil

import numpy as np

from hyper_parallel._select import get_platform
from hyper_parallel.checkpoint._layout import Box, intersect, layout_boxes, volume
from hyper_parallel.checkpoint._optimizers import optimizer_adapter
from hyper_parallel.checkpoint._safetensors import SAFETENSORS_DTYPES, SafetensorsFile, write_safetensors
from hyper_parallel.dtensor.module import named_parameter_specs

__all__ = ["EXPORT_FILE", "EXPORT_INDEX_FILE", "FORMAT", "INDEX_FILE", "VERSION", "load", "read_index", "save"]

_log = logging.getLogger(__name__)

FORMAT = "hyper_parallel.checkpoint"
"""The ``format`` field of every index."""
VERSION = 1
"""The index version this code writes and reads."""
INDEX_FILE = "index.json"
"""The index's file name inside a checkpoint directory."""

_MODEL, _OPTIM = "model/", "optimizer/"


# ---------------------------------------------------------------------------------------------- ranks taking part
class _Ranks:
    """The world the checkpoint is collective over (one process without a process group: rank 0 of 1)."""

    def __init__(self):
        p = get_platform()
        self.started = p.is_initialized()
        self.rank = p.get_rank() if self.started else 0
        self.size = p.get_world_size() if self.started else 1

    @contextlib.contextmanager
    def phase(self, what: str):
        """Run the block on every rank, then :meth:`agree`: an error on one rank raises on all of them."""
        try:
            yield
        except Exception as e:  # raised again right below, once every rank has learned of it
            self.agree(e, what)
            raise
        self.agree(None, what)

    def agree(self, failure: BaseException | None, what: str) -> None:
        """Every rank learns whether any rank failed the phase just ended; all raise if one did (the failing
        rank its own error). The collective is the phase's barrier."""
        failed = [self.rank] if failure is not None else []
        if self.size > 1:
            p = get_platform()
            flags = np.zeros(self.size, dtype=np.float32)
            flags[self.rank] = 1.0 if failure is not None else 0.0
            total = p.tolist(p.all_reduce(p.tensor(flags, dtype="float32")))
            failed = [r for r, v in enumerate(total) if v]
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"checkpoint.{what} failed on rank(s) {failed} (their own errors say why); this "
                               f"rank stopped with them")


# ---------------------------------------------------------------------------------------------- what is saved
@dataclasses.dataclass
class _Tensor:
    """A tensor this rank saves or loads: its global description and the boxes of it this rank holds."""

    name: str                     # "model/<parameter>" or "optimizer/<parameter>/<state key>"
    shape: tuple[int, ...]        # global shape; rank-local state: (world size, *its shape)
    dtype: str
    kind: str                     # "sharded", "replicated" or "rank_local"
    local_shape: tuple[int, ...]  # the shape the boxes index (rank-local state: (1, *its shape))
    boxes: list[Box]
    value: object                 # the local tensor: the Parameter, or an optimizer state tensor
    layout: str = ""              # informative, for the index

    def entry(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind, "layout": self.layout}


def _rank_local_names(model) -> set[str]:
    p = get_platform()
    names = set()
    for prefix, sub in p.named_modules(model):
        for n in getattr(sub, "rank_local_state", None) or ():
            names.add(f"{prefix}.{n}" if prefix else n)
    return names


def _model_tensors(model, ranks: _Ranks) -> list[_Tensor]:
    p = get_platform()
    if not isinstance(model, p.Module):
        raise TypeError(f"checkpoint: model must be a {p.Module.__module__}.{p.Module.__name__}, got "
                        f"{type(model).__name__}")
    rank_local = _rank_local_names(model)
    out = []
    for name, param, spec in named_parameter_specs(model):
        dtype, local_shape = p.dtype_name(param.dtype), tuple(int(s) for s in param.shape)
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"checkpoint: parameter {name!r} is {dtype}; supported dtypes: "
                            f"{list(SAFETENSORS_DTYPES)}")
        if name in rank_local:
            if spec is not None:
                raise ValueError(f"checkpoint: {name!r} is declared rank-local state but has a sharded layout")
            shape, kind = (ranks.size, *local_shape), "rank_local"
            view = (1, *local_shape)
            boxes = [Box((ranks.rank,) + (0,) * len(local_shape), view, (0,) * len(view))]
            layout = "one value per rank"
        elif spec is None:
            shape, kind, view, layout = local_shape, "replicated", local_shape, "whole on every rank"
            boxes = [Box((0,) * len(shape), shape, (0,) * len(shape))] if volume(shape) else []
        else:
            mesh = spec.device_mesh
            shape, kind = tuple(spec.shape), "sharded"
            view, boxes = layout_boxes(shape, mesh.shape, mesh.get_coordinate(), spec.placements,
                                       what=f"parameter {name!r}")
            if view != local_shape:
                raise ValueError(f"checkpoint: parameter {name!r} holds a local shard of {list(local_shape)}, but "
                                 f"its layout {list(spec.placements)} of {list(shape)} on mesh {list(mesh.shape)} "
                                 f"gives {list(view)}")
            layout = f"{', '.join(map(repr, spec.placements))} on mesh {list(mesh.shape)}"
        out.append(_Tensor(_MODEL + name, shape, dtype, kind, view, boxes, param, layout))
    return out


def _optimizer_tensors(optimizer, model_tensors: list[_Tensor]):
    """``(adapter, the model's names of its parameters in its order, the model's tensors by parameter id)``."""
    adapter = optimizer_adapter(optimizer)
    by_id = {id(t.value): t for t in model_tensors}
    names = []
    for q in adapter.params():
        t = by_id.get(id(q))
        if t is None:
            raise ValueError(f"checkpoint: the {adapter.description} holds a parameter of shape {list(q.shape)} "
                             "that is not a parameter of the model")
        if t.kind == "rank_local":
            raise ValueError(f"checkpoint: the optimizer steps {t.name[len(_MODEL):]!r}, which is rank-local state")
        names.append(t.name[len(_MODEL):])
    return adapter, names, by_id


def _saved_optimizer_tensors(optimizer, model_tensors: list[_Tensor]):
    p = get_platform()
    adapter, names, by_id = _optimizer_tensors(optimizer, model_tensors)
    params = adapter.params()
    tensors, scalars = [], {}
    for pos, (state, numbers) in adapter.read().items():
        base = by_id[id(params[pos])]
        for key, value in state.items():
            if p.dtype_name(value.dtype) not in SAFETENSORS_DTYPES:
                raise TypeError(f"checkpoint: optimizer state {names[pos]}/{key} is {p.dtype_name(value.dtype)}; "
                                f"supported dtypes: {list(SAFETENSORS_DTYPES)}")
            tensors.append(dataclasses.replace(base, name=f"{_OPTIM}{names[pos]}/{key}", value=value,
                                               dtype=p.dtype_name(value.dtype)))
        if numbers:
            scalars[names[pos]] = numbers
    return adapter, tensors, scalars


# ---------------------------------------------------------------------------------------------- paths
def _sibling(path: str, what: str) -> str:
    head, base = os.path.split(path)
    return os.path.join(head, f".{base}.{what}")


def _is_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, INDEX_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(path: str) -> None:
    if os.path.lexists(path) and (not os.path.isdir(path) or (os.listdir(path) and not _is_checkpoint(path))):
        raise ValueError(f"checkpoint.save: {path} exists and is not a {FORMAT} checkpoint (no {INDEX_FILE} of "
                         "that format); refusing to replace it: choose another path or remove it")


def _prepare(path: str, tmp: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)  # what an interrupted save left
    os.mkdir(tmp)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _publish(tmp: str, path: str) -> None:
    """Put the finished checkpoint in ``tmp`` at ``path``. At every moment one complete checkpoint exists: the
    previous one at ``path`` (or, between the two renames, at ``.<name>.previous``), then the new one."""
    old = _sibling(path, "previous")
    if os.path.lexists(path):
        if os.path.lexists(old):
            shutil.rmtree(old)  # path is complete, so this is a leftover
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")
    shutil.rmtree(old, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def _plan_file(rank: int) -> str:
    return f"plan-rank{rank:05d}.json"


def _piece_key(name: str, offsets) -> str:
    return f"{name}@{'_'.join(map(str, offsets))}"


def _check_extra(extra) -> None:
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise TypeError(f"checkpoint.save: extra must be a dict (JSON-serialisable) or None, got "
                        f"{type(extra).__name__}")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint.save: extra must be JSON-serialisable (dicts with str keys, lists, str, int, "
                        f"finite float, bool, None): {e}") from None


# ---------------------------------------------------------------------------------------------- save
def save(path, model, optimizer=None, extra: dict | None = None) -> None:
    """Save ``model`` (and ``optimizer``'s state, and ``extra``) to the directory ``path``. Every rank of the world
    calls it (one process without a process group may too).

    Each rank writes only the blocks of its own shards (no gather), a block held by several ranks once (by the
    lowest of them), as safetensors files, plus ``index.json`` describing every tensor. The files are written to
    ``.<name>.saving`` next to ``path`` and moved to ``path`` by rank 0 once every rank has finished: an error or
    a crash during the save leaves the previous checkpoint at ``path`` as it was. ``path`` must be on a file
    system every rank sees.

    Args:
        path: the checkpoint directory (replaced if it holds a checkpoint).
        model: a module (``torch.nn.Module`` / ``mindspore.nn.Cell``); every parameter is saved, trainable or
            not, sharded ones with their layout. State a module lists in ``rank_local_state`` (the MoE layer's
            ``tokens_per_expert``) is saved per rank.
        optimizer: the framework's optimizer over the model's parameters (``torch.optim`` optimizers,
            ``mindspore.nn.AdamWeightDecay``); its per-parameter state is saved laid out like the parameters.
        extra: a JSON-serialisable dict (step number, data position, RNG state...), saved for each rank;
            :func:`load` returns it.

    Raises:
        TypeError: ``extra`` is not JSON-serialisable, an unsupported optimizer, model or dtype.
        ValueError: ``path`` exists and is not a checkpoint; a layout a checkpoint cannot store (``Partial``).
        RuntimeError: another rank failed (its own error names the cause).
    """
    ranks, path = _Ranks(), os.path.abspath(os.fspath(path))
    tmp = _sibling(path, "saving")
    p = get_platform()
    # Each phase ends with one small all-reduce on every rank (the barrier), which also tells every rank whether
    # another one failed: all ranks raise together, none is left waiting in a collective.
    with ranks.phase("save"):
        _check_extra(extra)
        tensors = _model_tensors(model, ranks)
        adapter, scalars = None, {}
        if optimizer is not None:
            adapter, optim_tensors, scalars = _saved_optimizer_tensors(optimizer, tensors)
            tensors += optim_tensors
        _check_replaceable(path)  # on every rank: each names the problem
        if ranks.rank == 0:
            _prepare(path, tmp)

    with ranks.phase("save"):  # 1. each rank says what it holds
        plan = {"rank": ranks.rank, "framework": p.name, "extra": extra, "scalars": scalars,
                "optimizer": adapter.description if adapter is not None else None,
                "tensors": {t.name: {**t.entry(), "boxes": [[list(b.offsets), list(b.lengths)] for b in t.boxes]}
                            for t in tensors}}
        with open(os.path.join(tmp, _plan_file(ranks.rank)), "w") as f:
            json.dump(plan, f)

    with ranks.phase("save"):  # 2. each rank writes the blocks it is the lowest holder of
        plans = [_read_json(os.path.join(tmp, _plan_file(r))) for r in range(ranks.size)]
        owners = _owners(plans)
        mine = [(t, b) for t in tensors for b in t.boxes
                if owners[(t.name, tuple(b.offsets), tuple(b.lengths))] == ranks.rank]
        if mine:
            write_safetensors(os.path.join(tmp, _rank_file(ranks.rank)), _file_entries(mine),
                              {"format": FORMAT, "rank": str(ranks.rank)})

    with ranks.phase("save"):  # 3. rank 0 writes the index and moves the checkpoint into place
        if ranks.rank == 0:
            index = _build_index(tmp, plans, owners, p.name)
            _write_json(os.path.join(tmp, INDEX_FILE), index)
            for r in range(ranks.size):
                os.remove(os.path.join(tmp, _plan_file(r)))
            _publish(tmp, path)
            _log.info("saved %d tensors in %d files to %s", len(index["tensors"]), len(index["files"]), path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _owners(plans: list[dict]) -> dict:
    """``(name, offsets, lengths) -> lowest rank holding that block``; checks the ranks agree on each tensor."""
    owners: dict = {}
    described: dict[str, tuple[int, dict]] = {}
    bad = []
    for plan in plans:
        for name, t in plan["tensors"].items():
            desc = {k: t[k] for k in ("shape", "dtype", "kind")}
            first = described.setdefault(name, (plan["rank"], desc))
            if first[1] != desc:
                bad.append(f"{name}: rank {first[0]} has {first[1]}, rank {plan['rank']} has {desc}")
            for offsets, lengths in t["boxes"]:
                owners.setdefault((name, tuple(offsets), tuple(lengths)), plan["rank"])
    if bad:
        raise ValueError("checkpoint.save: the ranks disagree on tensors (is the same model on every rank?): "
                         + "; ".join(bad))
    return owners


def _file_entries(mine: list[tuple[_Tensor, Box]]):
    """``write_safetensors`` entries for this rank's blocks, converting each tensor to NumPy once."""
    p = get_platform()
    cache: dict = {}

    def block(t: _Tensor, b: Box):
        def produce():
            if cache.get("name") != t.name:  # one tensor's host copy at a time
                cache.clear()
                cache.update(name=t.name, array=p.to_numpy(t.value).reshape(t.local_shape))
            return cache["array"][b.local_index()]
        return produce

    return [(_piece_key(t.name, b.offsets), t.dtype, b.lengths, block(t, b)) for t, b in mine]


def _build_index(tmp: str, plans: list[dict], owners: dict, framework: str) -> dict:
    tensors: dict[str, dict] = {}
    for plan in plans:
        for name, t in plan["tensors"].items():
            entry = tensors.setdefault(name, {**{k: t[k] for k in ("shape", "dtype", "kind", "layout")},
                                              "pieces": []})
            for offsets, lengths in t["boxes"]:
                if owners[(name, tuple(offsets), tuple(lengths))] == plan["rank"]:
                    entry["pieces"].append({"file": _rank_file(plan["rank"]), "key": _piece_key(name, offsets),
                                            "offsets": offsets, "lengths": lengths})
    for name, entry in tensors.items():
        _check_tiling(name, entry)
    files = {}
    for plan in plans:
        f = _rank_file(plan["rank"])
        if os.path.exists(os.path.join(tmp, f)):
            files[f] = {"bytes": os.path.getsize(os.path.join(tmp, f))}
    scalars: dict[str, dict] = {}
    for plan in plans:  # the lowest rank's value of each
        for name, numbers in plan["scalars"].items():
            for key, value in numbers.items():
                scalars.setdefault(name, {}).setdefault(key, value)
    optimizers = {plan["optimizer"] for plan in plans}
    return {"format": FORMAT, "version": VERSION, "framework": framework, "world_size": len(plans),
            "optimizer": None if optimizers == {None} else {"type": sorted(o for o in optimizers if o)[0],
                                                             "scalars": scalars},
            "extra": [plan["extra"] for plan in plans], "files": files, "tensors": tensors}


def _check_tiling(name: str, entry: dict) -> None:
    """The pieces of a tensor cover it exactly once."""
    shape, pieces = entry["shape"], entry["pieces"]
    total = sum(volume(q["lengths"]) for q in pieces)
    for q in pieces:
        if any(o < 0 or o + n > s for o, n, s in zip(q["offsets"], q["lengths"], shape)):
            raise ValueError(f"checkpoint.save: a block of {name} at {q['offsets']} of {q['lengths']} lies outside "
                             f"its shape {shape}")
    for i, a in enumerate(pieces):
        for b in pieces[:i]:
            if intersect(a["offsets"], a["lengths"], b["offsets"], b["lengths"]) is not None:
                raise ValueError(f"checkpoint.save: blocks of {name} at {a['offsets']} and {b['offsets']} overlap "
                                 "(ranks hold different values of one region)")
    if total != volume(shape):
        raise ValueError(f"checkpoint.save: the ranks' blocks of {name} cover {total} of its {volume(shape)} "
                         "elements")


# ---------------------------------------------------------------------------------------------- load
def read_index(path) -> dict:
    """The index of the checkpoint at ``path`` (a dict: see ``docs/checkpoint.md``).

    Raises:
        ValueError: no checkpoint there (the message says where an interrupted save left the previous one), or
            an index of another format or version.
    """
    path = os.path.abspath(os.fspath(path))
    index_path = os.path.join(path, INDEX_FILE)
    if not os.path.exists(index_path):
        old = _sibling(path, "previous")
        hint = (f"; a save was interrupted while replacing it: the previous checkpoint is complete at {old} "
                "(move it back)") if _is_checkpoint(old) else ""
        raise ValueError(f"checkpoint.load: no checkpoint at {path} (no {INDEX_FILE}){hint}")
    try:
        index = _read_json(index_path)
    except ValueError as e:
        raise ValueError(f"checkpoint.load: {index_path} is not valid JSON ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"checkpoint.load: {index_path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"checkpoint.load: {index_path} has version {index.get('version')!r}; this code reads "
                         f"version {VERSION}")
    return index


EXPORT_INDEX_FILE = "model.safetensors.index.json"
"""The index of an export split over several files (the name and layout transformers' ``from_pretrained`` reads)."""
EXPORT_FILE = "model.safetensors"
"""An export in one file."""


def _export_files(path: str) -> tuple[str, list[str]] | None:
    """``(directory, files)`` of a consolidated safetensors set at ``path`` (a ``.safetensors`` file, or a
    directory with ``model.safetensors`` or ``model.safetensors.index.json``), else ``None``."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return os.path.dirname(path), [os.path.basename(path)]
    if os.path.exists(os.path.join(path, EXPORT_INDEX_FILE)):
        weight_map = _read_json(os.path.join(path, EXPORT_INDEX_FILE)).get("weight_map", {})
        return path, sorted(set(weight_map.values()))
    if os.path.exists(os.path.join(path, EXPORT_FILE)):
        return path, [EXPORT_FILE]
    return None


def _export_index(directory: str, files: list[str]) -> dict:
    """An index for a consolidated set: every tensor whole, in one file, under its own name."""
    tensors, sizes = {}, {}
    for name in files:
        full = os.path.join(directory, name)
        if not os.path.exists(full):
            raise ValueError(f"checkpoint.load: {full} is missing (listed in {EXPORT_INDEX_FILE})")
        f = SafetensorsFile(full)
        sizes[name] = {"bytes": os.path.getsize(full)}
        for key, (dtype, shape, _, _) in f.entries.items():
            if _MODEL + key in tensors:
                raise ValueError(f"checkpoint.load: tensor {key!r} is in two files of {directory}")
            tensors[_MODEL + key] = {"shape": list(shape), "dtype": dtype, "kind": "replicated", "layout": "",
                                     "pieces": [{"file": name, "key": key, "offsets": [0] * len(shape),
                                                 "lengths": list(shape)}]}
    return {"format": FORMAT, "version": VERSION, "framework": "safetensors", "world_size": 1, "exported": True,
            "optimizer": None, "extra": [None], "files": sizes, "tensors": tensors}


def _read_source(path: str) -> tuple[dict, str]:
    """``(index, directory of its files)`` of a checkpoint or of a consolidated safetensors set."""
    if not os.path.exists(os.path.join(path, INDEX_FILE)):
        found = _export_files(path)
        if found is not None:
            return _export_index(*found), found[0]
    return read_index(path), path


def _check_against(index: dict, tensors: list[_Tensor], path: str, what: str) -> None:
    """Names, kinds, shapes and dtypes of ``tensors`` against the index's entries under the same prefix."""
    saved = index["tensors"]
    want = {t.name: t for t in tensors}
    prefix = what + "/"
    missing = sorted(n[len(prefix):] for n in want if n not in saved)
    unexpected = sorted(n[len(prefix):] for n in saved if n.startswith(prefix) and n not in want)
    problems = []
    if missing:
        problems.append(f"missing keys (in the {what}, not in the checkpoint): {missing}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the {what}): {unexpected}")
    shapes, dtypes = [], []
    for name, t in want.items():
        entry = saved.get(name)
        if entry is None:
            continue
        short = name[len(prefix):]
        if (entry["kind"] == "rank_local") != (t.kind == "rank_local"):
            shapes.append(f"{short}: saved as {entry['kind']}, the {what} holds it as {t.kind}")
        elif t.kind == "rank_local" and entry["shape"][1:] != list(t.shape[1:]):
            shapes.append(f"{short}: checkpoint {entry['shape'][1:]} per rank, {what} {list(t.shape[1:])}")
        elif t.kind != "rank_local" and entry["shape"] != list(t.shape):
            shapes.append(f"{short}: checkpoint {entry['shape']}, {what} {list(t.shape)}")
        if entry["dtype"] != t.dtype and what == "model":
            dtypes.append(f"{short}: checkpoint {entry['dtype']}, {what} {t.dtype}")
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes))
    if problems:
        raise ValueError(f"checkpoint.load: {path} does not fit the {what}: " + "; ".join(problems))
    if dtypes:
        raise TypeError(f"checkpoint.load: {path} does not fit the {what}: dtype mismatch (cast the {what} to the "
                        "saved dtypes before loading): " + "; ".join(dtypes))


def _check_files(index: dict, path: str) -> None:
    problems = []
    for name, info in index["files"].items():
        f = os.path.join(path, name)
        if not os.path.exists(f):
            problems.append(f"{name} is missing")
        elif os.path.getsize(f) != info["bytes"]:
            problems.append(f"{name} has {os.path.getsize(f)} bytes, the index says {info['bytes']} (truncated or "
                            "replaced)")
    for name, entry in index["tensors"].items():
        for piece in entry["pieces"]:
            if piece["file"] not in index["files"]:
                problems.append(f"{name} has a block in {piece['file']}, which the index does not list")
    if problems:
        raise ValueError(f"checkpoint.load: {path} is damaged: " + "; ".join(problems))


class _Files:
    """The checkpoint's files, opened on first use."""

    def __init__(self, path: str):
        self.path, self._open = path, {}

    def read(self, piece: dict, index: tuple[slice, ...]) -> np.ndarray:
        name = piece["file"]
        if name not in self._open:
            self._open[name] = SafetensorsFile(os.path.join(self.path, name))
        f = self._open[name]
        if piece["key"] not in f.entries:
            raise ValueError(f"checkpoint.load: {f.path} has no tensor {piece['key']!r}, which the index places "
                             "there")
        return f.read(piece["key"], index)


def _assemble(t: _Tensor, entry: dict, files: _Files) -> np.ndarray:
    """This rank's local array of ``t`` from the saved blocks that meet its boxes."""
    dtype = np.float32 if entry["dtype"] == "bfloat16" else SAFETENSORS_DTYPES[entry["dtype"]][1]
    out = np.empty(t.local_shape, dtype=np.dtype(dtype).newbyteorder("="))
    covered = 0
    for box in t.boxes:
        for piece in entry["pieces"]:
            common = intersect(box.offsets, box.lengths, piece["offsets"], piece["lengths"])
            if common is None:
                continue
            starts, lengths = common
            src = tuple(slice(s - o, s - o + n) for s, n, o in zip(starts, lengths, piece["offsets"]))
            dst = tuple(slice(lo + s - o, lo + s - o + n)
                        for s, n, o, lo in zip(starts, lengths, box.offsets, box.local))
            out[dst] = files.read(piece, src)
            covered += volume(lengths)
    needed = sum(volume(b.lengths) for b in t.boxes)
    if covered != needed:
        raise ValueError(f"checkpoint.load: the saved blocks of {t.name} cover {covered} of the {needed} elements "
                         "this rank needs")
    return out


def _rank_local_value(t: _Tensor, entry: dict, files: _Files, ranks: _Ranks) -> np.ndarray:
    """This rank's value of rank-local state saved by ``entry['shape'][0]`` ranks: its own at the same world size;
    else the sum of the saved values on rank 0 and zeros elsewhere, so the sum over the ranks (the load
    ``update_expert_bias(group=...)`` reads over them) is kept."""
    saved_ranks = entry["shape"][0]
    if saved_ranks == ranks.size:
        return _assemble(t, entry, files)
    every = dataclasses.replace(t, local_shape=tuple(entry["shape"]),
                                boxes=[Box((0,) * len(entry["shape"]), tuple(entry["shape"]),
                                           (0,) * len(entry["shape"]))])
    rows = _assemble(every, entry, files)
    if rows.any():
        _log.warning("checkpoint.load: %s was saved by %d ranks and is loaded by %d: rank 0 takes the sum of "
                     "the saved values, the others zeros (the sum over the ranks is kept)", t.name, saved_ranks,
                     ranks.size)
    return rows.sum(axis=0, keepdims=True) if ranks.rank == 0 else np.zeros_like(rows[:1])


def _to_tensor(array: np.ndarray, dtype: str):
    return get_platform().tensor(np.ascontiguousarray(array), dtype=dtype)


def load(path, model, optimizer=None):
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``), whatever layout, world size or
    framework saved it; return the ``extra`` saved with it. Every rank of the world calls it (one process without
    a process group may too).

    Each rank reads only the blocks of the saved tensors that meet its own shards, and writes them into the
    parameters in place (the optimizer's references stay valid). Before anything is read the index is checked
    against the model: every missing or unexpected key, shape and dtype mismatch and damaged file is named.

    Args:
        path: a checkpoint directory written by :func:`save`; or a consolidated safetensors set (what
            :func:`export` writes, or a ``.safetensors`` file, or a directory with ``model.safetensors`` or
            ``model.safetensors.index.json``) whose tensor names are the model's parameter names: it is imported
            into the model's layout (rank-local state is left as it is).
        model: the module to load into, laid out as it is to be used (any layout of the saved parameters).
        optimizer: load the optimizer state too (it must have been saved). Its hyperparameters stay its own.

    Returns:
        The ``extra`` dict saved by the rank of the same number when the world size is the one saved, else rank
        0's (``None`` if none was saved).

    Raises:
        ValueError: no checkpoint at ``path``, a missing / unexpected key, a shape mismatch, a missing or
            truncated file (each named).
        TypeError: a dtype mismatch, an unsupported optimizer.
        RuntimeError: another rank failed (its own error names the cause).
    """
    ranks, path = _Ranks(), os.path.abspath(os.fspath(path))
    with ranks.phase("load"):  # everything is checked before anything is read
        index, directory = _read_source(path)
        tensors = _model_tensors(model, ranks)
        if index.get("exported"):  # an export holds no training state: rank-local state keeps its value
            tensors = [t for t in tensors if t.kind != "rank_local"]
        _check_against(index, tensors, path, "model")
        optim = None
        if optimizer is not None:
            optim = _loaded_optimizer_tensors(index, optimizer, tensors, path)
        _check_files(index, directory)

    with ranks.phase("load"):
        files = _Files(directory)
        for t in tensors:  # one tensor's blocks in memory at a time
            entry = index["tensors"][t.name]
            value = _rank_local_value(t, entry, files, ranks) if t.kind == "rank_local" else \
                _assemble(t, entry, files)
            get_platform().assign(t.value, _to_tensor(value.reshape(tuple(t.value.shape)), t.dtype))
        if optim is not None:
            adapter, wanted, scalars = optim
            states: dict[int, tuple[dict, dict]] = {}
            for pos, key, t in wanted:
                array = _assemble(t, index["tensors"][t.name], files).reshape(tuple(t.value.shape))
                states.setdefault(pos, ({}, {}))[0][key] = _to_tensor(array, index["tensors"][t.name]["dtype"])
            for pos, numbers in scalars.items():
                states.setdefault(pos, ({}, {}))[1].update(numbers)
            adapter.write(states)
        _log.info("loaded %s (saved by %d ranks on %s)", path, index["world_size"], index["framework"])
    extra = index.get("extra") or [None]
    return extra[ranks.rank] if len(extra) == ranks.size else extra[0]


def _loaded_optimizer_tensors(index: dict, optimizer, model_tensors: list[_Tensor], path: str):
    """``(adapter, [(position, key, target tensor)], {position: scalars})`` after checking the saved state fits."""
    if index.get("optimizer") is None:
        raise ValueError(f"checkpoint.load: {path} holds no optimizer state (it was saved without optimizer=); "
                         "load it without optimizer=")
    adapter, names, by_id = _optimizer_tensors(optimizer, model_tensors)
    position = {n: i for i, n in enumerate(names)}
    params = adapter.params()
    saved_scalars = index["optimizer"].get("scalars", {})
    wanted, unexpected, targets = [], [], []
    for name in index["tensors"]:
        if not name.startswith(_OPTIM):
            continue
        param, _, key = name[len(_OPTIM):].rpartition("/")
        if param not in position or (adapter.tensor_keys is not None and key not in adapter.tensor_keys):
            unexpected.append(name[len(_OPTIM):])
            continue
        base = by_id[id(params[position[param]])]
        t = dataclasses.replace(base, name=name, value=base.value)
        wanted.append((position[param], key, t))
        targets.append(t)
    scalars = {}
    for param, numbers in saved_scalars.items():
        if param not in position:
            unexpected.append(f"{param} (scalars {sorted(numbers)})")
            continue
        keep = {k: v for k, v in numbers.items() if adapter.scalar_keys is None or k in adapter.scalar_keys}
        unexpected += [f"{param}/{k}" for k in numbers if k not in keep]
        scalars[position[param]] = keep
    if unexpected:
        raise ValueError(f"checkpoint.load: {path} does not fit the optimizer ({adapter.description}): unexpected "
                         f"keys (in the checkpoint, not in the optimizer): {sorted(unexpected)}")
    shapes = [f"{t.name[len(_OPTIM):]}: checkpoint {index['tensors'][t.name]['shape']}, parameter {list(t.shape)}"
              for t in targets if index["tensors"][t.name]["shape"] != list(t.shape)]
    if shapes:
        raise ValueError(f"checkpoint.load: {path} does not fit the optimizer: shape mismatch: " + "; ".join(shapes))
    return adapter, wanted, scalars
