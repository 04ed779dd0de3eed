"""DeviceMesh, placements, DTensor and sharded module parameters, with ``torch.distributed.tensor``'s names."""

from hyper_parallel.dtensor.device_mesh import DeviceMesh, init_device_mesh
from hyper_parallel.dtensor.dtensor import DTensor, distribute_tensor
from hyper_parallel.dtensor.module import (
    ParameterSpec,
    distribute_module,
    distribute_parameter,
    full_parameter,
    get_parameter_spec,
    named_parameter_specs,
)
from hyper_parallel.dtensor.placement import Partial, Placement, Replicate, Shard, StridedShard

__all__ = ["DTensor", "DeviceMesh", "ParameterSpec", "Partial", "Placement", "Replicate", "Shard", "StridedShard",
           "distribute_module", "distribute_parameter", "distribute_tensor", "full_parameter", "get_parameter_spec",
           "init_device_mesh", "named_parameter_specs"]
