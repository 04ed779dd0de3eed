"""The demo model as a ``torch.nn.Module`` (see :mod:`hyper_parallel.demo.model`)."""

import torch

from hyper_parallel.demo.model import DemoModelMixin


class DemoModel(DemoModelMixin, torch.nn.Module):
    __doc__ = DemoModelMixin.__doc__
