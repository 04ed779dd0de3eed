"""Ascend adapter through torch_npu: the torch adapter with the ``npu`` device and HCCL.

What differs from :class:`~platform_adapters.torch.TorchPlatform`, and why:

* device ``npu:<LOCAL_RANK>`` and the ``hccl`` collective library;
* every collective is issued with ``async_op=True`` and its handle waited on explicitly before the output is
  returned: HCCL runs on its own stream and, unlike NCCL through torch, does not make the caller's stream wait, so
  reading an output without ``handle.wait()`` can see stale data.

``torch_npu`` is imported when the platform is created (importing it registers the ``npu`` device with torch), not
when this module is imported, so the selection and error paths can be exercised on hosts without Ascend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hyper_parallel.platform import WorldEnv
from platform_adapters.torch import TorchPlatform


class TorchNpuPlatform(TorchPlatform):
    """PyTorch on Ascend NPUs through torch_npu and HCCL."""

    name = "torch_npu"

    def __init__(self) -> None:
        super().__init__()
        self._torch_npu = self._import_torch_npu()

    @staticmethod
    def _import_torch_npu() -> Any:
        try:
            import torch_npu  # registers the npu device as torch.npu
        except ImportError as e:
            raise ImportError(
                f"backend 'torch_npu' could not import torch_npu ({e}); fix: pip install torch-npu matching your "
                "torch and CANN versions"
            ) from None
        return torch_npu

    @property
    def dist_backend(self) -> str:
        return "hccl"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "torch_npu": str(getattr(self._torch_npu, "__version__", "unknown"))}

    def _select_device(self, env: WorldEnv) -> None:
        self._device = torch.device("npu", env.local_rank % torch.npu.device_count())
        torch.npu.set_device(self._device)

    def _barrier(self, group) -> None:
        self._issue(torch.distributed.barrier, group=group.native)

    def _issue(self, collective: Callable, *args, **kwargs) -> None:
        # HCCL: the output may only be read after the handle's wait() (no implicit cross-stream sync).
        collective(*args, async_op=True, **kwargs).wait()
