"""The demo model as a ``mindspore.nn.Cell`` (see :mod:`hyper_parallel.demo.model`)."""

from hyper_parallel.demo.model import DemoModelMixin
from hyper_parallel.moe.mindspore import Cell


class DemoModel(DemoModelMixin, Cell):
    __doc__ = DemoModelMixin.__doc__
