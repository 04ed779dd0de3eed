"""Expert parallelism on a Hugging Face transformers MoE model (Qwen3-MoE), trained with AdamW for a few steps.

    python -m hyper_parallel.launch --nproc 2 examples/transformers_moe.py

Every rank builds the same model (one seed), makes the experts of every MoE block expert-parallel with one call,
adds data parallelism over the same ranks (each feeds its own batch) and trains with AdamW and global-norm clipping.
The script checks every step's loss and gradient norm against the same model trained on one process on all ranks'
batches, and exits non-zero if they differ.
"""

import copy

import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from hyper_parallel import DataParallel, clip_grad_norm_, get_platform, init_device_mesh
from hyper_parallel.integrations.transformers import parallelize_experts

p = get_platform()
p.init_process_group()
rank, world = p.get_rank(), p.get_world_size()

torch.manual_seed(0)  # the same initial weights on every rank
config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_experts=8, num_experts_per_tok=2)
model = Qwen3MoeForCausalLM(config)
reference = copy.deepcopy(model)  # the same model, left whole, for the check below

mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
names = parallelize_experts(model, mesh)  # ExpertParallel() on every MoE block's experts
if rank == 0:
    print(f"expert-parallel over {world} ranks: {names}")


# every rank feeds its own batch: gradients are reduced to those of the mean loss over all ranks' batches, in backward
DataParallel(data_axes=("ep",)).apply(model, mesh)

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
for step in range(4):
    batches = torch.randint(0, config.vocab_size, (world, 2, 16), generator=torch.Generator().manual_seed(step))
    loss = model(input_ids=batches[rank], labels=batches[rank]).loss
    loss.backward()
    norm = clip_grad_norm_(model.parameters(), max_norm=1.0)  # the norm of the whole model's gradient
    optimizer.step()
    optimizer.zero_grad()

    # the reference: one process, every rank's batch, the mean of the per-batch losses
    ref_loss = sum(reference(input_ids=b, labels=b).loss for b in batches) / world
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
    ref_optimizer.step()
    ref_optimizer.zero_grad()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    diff = abs(mean_loss.item() - ref_loss.item())
    if rank == 0:
        print(f"step {step}: loss {mean_loss.item():.6f} (one process {ref_loss.item():.6f}), gradient norm "
              f"{norm.item():.6f} (one process {ref_norm.item():.6f})")
    # (fp32 summation order differs; AdamW's m / sqrt(v) amplifies it where gradients are near zero)
    if diff > 1e-5 * abs(ref_loss.item()) or abs(norm.item() - ref_norm.item()) > 1e-4 * ref_norm.item():
        raise SystemExit(f"rank {rank}: step {step} differs from the single-process run (loss {mean_loss.item()} vs "
                         f"{ref_loss.item()}, norm {norm.item()} vs {ref_norm.item()})")
print(f"rank {rank}: the expert-parallel Qwen3-MoE trained as on one process")
