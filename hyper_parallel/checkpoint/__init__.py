"""Distributed checkpoints that reshard across layouts, world sizes and frameworks.

>>> from hyper_parallel import checkpoint
>>> checkpoint.save("ckpt/step_100", model, optimizer, extra={"step": 100})   # doctest: +SKIP
>>> extra = checkpoint.load("ckpt/step_100", model, optimizer)                # doctest: +SKIP
>>> checkpoint.export("exported", model)              # one consolidated safetensors set  # doctest: +SKIP

See ``docs/checkpoint.md`` for the format, resharding, the cross-framework rules and atomicity.
"""

from hyper_parallel.checkpoint._checkpoint import (
    EXPORT_FILE,
    EXPORT_INDEX_FILE,
    FORMAT,
    INDEX_FILE,
    VERSION,
    load,
    read_index,
    save,
)
from hyper_parallel.checkpoint._export import consolidate, export

__all__ = ["EXPORT_FILE", "EXPORT_INDEX_FILE", "FORMAT", "INDEX_FILE", "VERSION", "consolidate", "export", "load",
           "read_index", "save"]
