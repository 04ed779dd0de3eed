"""The torch_npu adapter's Python logic, run on CPU/gloo (no Ascend hardware here).

Everything the NPU adapter adds on top of the torch adapter runs unchanged (every collective issued with
``async_op=True`` and waited on explicitly); only the device and the collective library are swapped for CPU/gloo.
Tests using it say so in their ids (``torch_npu_logic_on_gloo``).
"""

import torch

from platform_adapters.torch_npu import TorchNpuPlatform


class TorchNpuLogicOnGloo(TorchNpuPlatform):
    @staticmethod
    def _import_torch_npu():
        return None

    @property
    def dist_backend(self) -> str:
        return "gloo"

    def _select_device(self, env) -> None:
        self._device = torch.device("cpu")
