"""Expert parallelism on torchtitan 0.3.0's MoE layer, with torchtitan's forward unchanged.

    python -m hyper_parallel.launch --nproc 2 examples/torchtitan_moe.py

Every rank builds the same torchtitan MoE (one seed), makes its experts expert-parallel with one call and runs its
own tokens forward and backward. The script checks the output, the input gradient and every rank's expert-shard
gradients against the same MoE run on one process on all ranks' tokens, and exits non-zero if they differ.
"""

import copy
import functools

import torch
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

from hyper_parallel import get_platform, init_device_mesh
from hyper_parallel.integrations.torchtitan import parallelize_moe

p = get_platform()
p.init_process_group()
rank, world = p.get_rank(), p.get_world_size()

dim, hidden, num_experts, top_k = 64, 32, 8, 2
normal = functools.partial(torch.nn.init.normal_, std=0.1)
config = MoE.Config(
    num_experts=num_experts,
    routed_experts=RoutedExperts.Config(
        inner_experts=GroupedExperts.Config(dim=dim, hidden_dim=hidden, num_experts=num_experts,
                                            param_init={name: normal for name in ("w1_EFD", "w2_EDF", "w3_EFD")}),
        token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=top_k)),  # no EP in torchtitan
    router=TokenChoiceTopKRouter.Config(num_experts=num_experts, top_k=top_k, score_func="softmax",
                                        gate=Linear.Config(in_features=dim, out_features=num_experts)),
)
torch.manual_seed(0)  # the same initial weights on every rank
moe = config.build()
moe.init_states(buffer_device=torch.device("cpu"))
reference = copy.deepcopy(moe)  # the same layer, left whole, for the check below

mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
print(f"rank {rank}: expert-parallel {parallelize_moe(moe, mesh)}")  # ['routed_experts.inner_experts']

tokens = torch.randn(world, 2, 8, dim, generator=torch.Generator().manual_seed(1))  # every rank's batch
x = tokens[rank].clone().requires_grad_(True)
out = moe(x)
out.square().sum().backward()

# the reference: one process, all ranks' tokens in one batch (torchtitan's experts compute in bfloat16, so the
# expert-weight gradients match only when the rows of each expert are summed in the same order: rank by rank)
x_all = tokens.clone().requires_grad_(True)
ref_out = reference(x_all.flatten(0, 1)).reshape(tokens.shape)
ref_out.square().sum().backward()


def check(what, got, want):
    err = ((got - want).norm() / want.norm()).item()
    if err > 1e-5:
        raise SystemExit(f"rank {rank}: {what} differs from the single-process run (relative error {err:.2e})")
    return err


errors = [check("output", out, ref_out[rank]), check("input gradient", x.grad, x_all.grad[rank])]
local = num_experts // world  # this rank's experts: a contiguous block of the global ones
for name, param in moe.routed_experts.inner_experts.named_parameters():
    want = dict(reference.routed_experts.inner_experts.named_parameters())[name].grad
    errors.append(check(f"{name} gradient", param.grad, want[rank * local:(rank + 1) * local]))
print(f"rank {rank}: torchtitan MoE expert-parallel matches one process (max relative error {max(errors):.1e})")
