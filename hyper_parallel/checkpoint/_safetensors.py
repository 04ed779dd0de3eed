"""The safetensors file format, written and read with NumPy alone (no framework, no extra dependency).

A file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (padded with spaces to a multiple of 8)
mapping each tensor's key to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data that
follows the header) plus an optional ``"__metadata__"`` of strings, then the tensors' bytes, little-endian, C order,
back to back. The files are what the ``safetensors`` library reads and writes (the tests check both ways).

bfloat16, which NumPy lacks, is handled as float32 in memory and stored as the upper 16 bits of each float32 (exact
for bfloat16 values). Reading maps the file (``numpy.memmap``): a slice reads only the bytes it covers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import numpy as np

__all__ = ["SAFETENSORS_DTYPES", "SafetensorsFile", "storage_nbytes", "write_safetensors"]

#: neutral dtype name -> (safetensors dtype code, NumPy dtype of the stored bytes)
SAFETENSORS_DTYPES = {
    "bool": ("BOOL", np.dtype("bool")),
    "int32": ("I32", np.dtype("<i4")),
    "int64": ("I64", np.dtype("<i8")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),
    "float32": ("F32", np.dtype("<f4")),
    "float64": ("F64", np.dtype("<f8")),
}
_NAMES = {code: name for name, (code, _) in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _check_dtype(dtype: str) -> None:
    if dtype not in SAFETENSORS_DTYPES:
        raise TypeError(f"checkpoint: dtype {dtype!r} cannot be stored; supported: {list(SAFETENSORS_DTYPES)}")


def storage_nbytes(dtype: str, shape) -> int:
    """Bytes a tensor of ``dtype`` and ``shape`` takes in a file."""
    _check_dtype(dtype)
    return int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype][1].itemsize


def _to_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """The bytes to store for ``array`` (holding ``dtype`` values: float32 for bfloat16), C-contiguous."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        return (bits >> 16).astype("<u2")
    return np.ascontiguousarray(array, dtype=SAFETENSORS_DTYPES[dtype][1])


def _from_storage(stored: np.ndarray, dtype: str) -> np.ndarray:
    """In-memory values of stored bytes (bfloat16 widened to float32), a fresh array."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return np.array(stored, dtype=stored.dtype.newbyteorder("="))


def write_safetensors(path: str, entries: Iterable[tuple[str, str, tuple[int, ...], object]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file; return its size in bytes.

    ``entries``: ``(key, dtype, shape, produce)`` where ``produce()`` returns the NumPy array (called one entry at
    a time while writing, so only one tensor's bytes are in memory at once). The file is flushed to disk.

    Raises:
        TypeError: a dtype the format cannot hold.
        ValueError: a duplicate key, or an array whose shape is not the declared one.
    """
    entries = list(entries)
    header: dict[str, object] = {}
    offset = 0
    for key, dtype, shape, _ in entries:
        if key in header or key == "__metadata__":
            raise ValueError(f"safetensors: duplicate or reserved key {key!r}")
        n = storage_nbytes(dtype, shape)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype][0], "shape": [int(s) for s in shape],
                       "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key, dtype, shape, produce in entries:
            array = np.asarray(produce())
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"safetensors: {key!r} was declared {list(shape)} but is {list(array.shape)}")
            f.write(memoryview(_to_storage(array, dtype)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)


class SafetensorsFile:
    """A safetensors file opened for reading slices of its tensors.

    Raises:
        ValueError: the file is not a well-formed safetensors file, or is shorter than its header says
            (truncated); the message names the file.
    """

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                 "length)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"{path}: not a safetensors file or truncated (header of {n} bytes, file of "
                                 f"{size} bytes)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end = 0
        for key, info in header.items():
            code = info.get("dtype") if isinstance(info, dict) else None
            if code not in _NAMES:
                raise ValueError(f"{path}: tensor {key!r} has dtype {code!r}; readable: {sorted(_NAMES)}")
            dtype, shape = _NAMES[code], tuple(int(s) for s in info["shape"])
            begin, stop = (int(v) for v in info["data_offsets"])
            if stop - begin != storage_nbytes(dtype, shape):
                raise ValueError(f"{path}: tensor {key!r} of {list(shape)} {dtype} spans {stop - begin} bytes, "
                                 f"not {storage_nbytes(dtype, shape)}")
            self.entries[key] = (dtype, shape, begin, stop)
            end = max(end, stop)
        if self._data_start + end > size:
            raise ValueError(f"{path}: truncated: its header describes {self._data_start + end} bytes, the file "
                             f"has {size}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Tensor ``key`` (or the block ``index`` of it, a tuple of slices) as a fresh array; only the bytes of
        the block are read."""
        dtype, shape, begin, stop = self.entries[key]
        numel = int(np.prod(shape, dtype=np.int64))
        stored_dtype = SAFETENSORS_DTYPES[dtype][1]
        if numel == 0:
            data = np.zeros(shape, dtype=stored_dtype)
        else:
            # (a mapping of at least one element: NumPy cannot map a 0-d or empty region)
            data = np.memmap(self.path, dtype=stored_dtype, mode="r", offset=self._data_start + begin,
                             shape=(numel,)).reshape(shape)
        if index is not None:
            data = data[index]
        return _from_storage(data, dtype)
