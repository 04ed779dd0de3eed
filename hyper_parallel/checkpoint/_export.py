"""Export for inference: a model's parameters as one consolidated safetensors set under their own names.

The set is what transformers' ``from_pretrained`` reads for a model of the same parameter names: one
``model.safetensors``, or, above ``max_shard_bytes``, ``model-00001-of-0000N.safetensors`` files and a
``model.safetensors.index.json`` mapping each name to its file; the files' metadata says ``"format": "pt"``.
:func:`~hyper_parallel.checkpoint.load` imports such a set into any layout.
"""

from __future__ import annotations

import os
import shutil

from hyper_parallel.checkpoint._checkpoint import (
    _MODEL,
    EXPORT_FILE,
    EXPORT_INDEX_FILE,
    FORMAT,
    _assemble,
    _check_files,
    _export_files,
    _Files,
    _publish,
    _Ranks,
    _read_json,
    _sibling,
    _Tensor,
    _write_json,
    read_index,
    save,
)
from hyper_parallel.checkpoint._layout import Box
from hyper_parallel.checkpoint._safetensors import SafetensorsFile, storage_nbytes, write_safetensors

__all__ = ["consolidate", "export"]

_EXPORTED_BY = "exported_by"


def _is_export(path: str) -> bool:
    found = _export_files(path)
    if found is None:
        return False
    directory, files = found
    try:
        if len(files) > 1 or os.path.exists(os.path.join(directory, EXPORT_INDEX_FILE)):
            return _read_json(os.path.join(directory, EXPORT_INDEX_FILE)).get("metadata", {}).get(_EXPORTED_BY) \
                == FORMAT
        return SafetensorsFile(os.path.join(directory, files[0])).metadata.get(_EXPORTED_BY) == FORMAT
    except (OSError, ValueError):
        return False


def _check_export_replaceable(path: str) -> None:
    if os.path.lexists(path) and (not os.path.isdir(path) or (os.listdir(path) and not _is_export(path))):
        raise ValueError(f"checkpoint.export: {path} exists and is not an export of {FORMAT}; refusing to "
                         "replace it: choose another path or remove it")


def _positive_or_none(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"checkpoint.{what}: max_shard_bytes must be a positive int or None, got {value!r}")


def consolidate(checkpoint, path, *, max_shard_bytes: int | None = None) -> list[str]:
    """Write the model parameters of the checkpoint at ``checkpoint`` as one consolidated safetensors set at the
    directory ``path``; return the files written. One process, no process group, no framework: it holds one full
    tensor in memory at a time. Rank-local training state (the MoE layer's load counts) and optimizer state are
    left out. ``path`` is replaced atomically, as :func:`~hyper_parallel.checkpoint.save` replaces a checkpoint.

    Args:
        max_shard_bytes: split the set into files of at most this many bytes (a tensor larger than that gets a
            file of its own), with a ``model.safetensors.index.json``; ``None``: one ``model.safetensors``.

    Raises:
        ValueError: no checkpoint at ``checkpoint`` or a damaged one; ``path`` exists and is not an export.
    """
    _positive_or_none(max_shard_bytes, "consolidate")
    src, dst = os.path.abspath(os.fspath(checkpoint)), os.path.abspath(os.fspath(path))
    index = read_index(src)
    _check_files(index, src)
    _check_export_replaceable(dst)
    names = [n for n, e in index["tensors"].items() if n.startswith(_MODEL) and e["kind"] != "rank_local"]
    shards: list[list[str]] = []
    size = 0
    for name in names:
        entry = index["tensors"][name]
        n = storage_nbytes(entry["dtype"], entry["shape"])
        if not shards or (max_shard_bytes is not None and size + n > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if not shards:
        shards = [[]]
    files = [EXPORT_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tmp = _sibling(dst, "saving")
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.mkdir(tmp)
    reader = _Files(src)

    def whole(name: str):
        entry = index["tensors"][name]
        shape = tuple(entry["shape"])
        t = _Tensor(name, shape, entry["dtype"], entry["kind"], shape, [Box((0,) * len(shape), shape,
                                                                             (0,) * len(shape))], None)
        return lambda: _assemble(t, entry, reader)

    total = 0
    for file, shard in zip(files, shards):
        entries = [(n[len(_MODEL):], index["tensors"][n]["dtype"], tuple(index["tensors"][n]["shape"]), whole(n))
                   for n in shard]
        total += sum(storage_nbytes(dtype, shape) for _, dtype, shape, _ in entries)
        write_safetensors(os.path.join(tmp, file), entries, {"format": "pt", _EXPORTED_BY: FORMAT})
    if len(files) > 1:
        weight_map = {n[len(_MODEL):]: file for file, shard in zip(files, shards) for n in shard}
        _write_json(os.path.join(tmp, EXPORT_INDEX_FILE),
                    {"metadata": {"total_size": total, _EXPORTED_BY: FORMAT}, "weight_map": weight_map})
    _publish(tmp, dst)
    return files


def export(path, model, *, max_shard_bytes: int | None = None) -> list[str]:
    """Export ``model`` for inference: its parameters, full, under their own names, as one consolidated
    safetensors set in the directory ``path`` (see :func:`consolidate`); returns the files. Every rank calls it.

    No rank gathers the model: the ranks save their shards (as :func:`~hyper_parallel.checkpoint.save`, into
    ``.<name>.export-checkpoint`` next to ``path``), then rank 0 assembles one tensor at a time from the files.

    Raises:
        ValueError: ``path`` exists and is not an export; ``max_shard_bytes`` is not a positive int.
        RuntimeError: another rank failed.
    """
    _positive_or_none(max_shard_bytes, "export")
    ranks, dst = _Ranks(), os.path.abspath(os.fspath(path))
    work = _sibling(dst, "export-checkpoint")
    with ranks.phase("export"):
        _check_export_replaceable(dst)
    save(work, model)
    files: list[str] = []
    with ranks.phase("export"):
        if ranks.rank == 0:
            files = consolidate(work, dst, max_shard_bytes=max_shard_bytes)
            shutil.rmtree(work)
    if ranks.rank != 0:  # rank 0 finished before the agreement above
        files = _export_files(dst)[1]
    return files
