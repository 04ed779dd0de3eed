"""Train this project's MoE layer on a (dp, ep) mesh: expert parallelism inside data parallelism, the framework's own
AdamW and global-norm clipping; the same script on PyTorch and MindSpore.

    HYPER_PARALLEL_PLATFORM=torch     python -m hyper_parallel.launch --nproc 4 examples/train_moe_data_parallel.py
    HYPER_PARALLEL_PLATFORM=mindspore python -m hyper_parallel.launch --nproc 4 examples/train_moe_data_parallel.py

Every rank feeds its own batch. After each step the script compares the loss and the gradient norm with the same
model trained on one process on all ranks' batches, and at the end every parameter (gathered), and exits non-zero if
they differ.
"""

import numpy as np

from hyper_parallel import (
    DataParallel,
    ExpertParallel,
    clip_grad_norm_,
    clip_grads,
    full_parameter,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    moe,
    reduce_gradients,
)

p = get_platform()
p.init_process_group()
rank, world = p.get_rank(), p.get_world_size()
TORCH = p.name.startswith("torch")

mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
model = moe.MoE(dim=16, hidden_dim=32, num_experts=8, top_k=2, num_shared_experts=1, init_std=0.2, seed=0)
reference = moe.MoE(dim=16, hidden_dim=32, num_experts=8, top_k=2, num_shared_experts=1, init_std=0.2, seed=0)

ExpertParallel().apply(model.experts, mesh["ep"])  # the experts split over ep
DataParallel(data_axes=("dp", "ep")).apply(model, mesh)  # every rank of the mesh feeds different tokens


def batch(step, data_rank):
    rng = np.random.RandomState(100 * step + data_rank)
    return p.tensor(rng.randn(8, 16).astype(np.float32)), p.tensor(rng.randn(8, 16).astype(np.float32))


def mean_loss(layer, batches):
    return sum(((layer(x) - y) ** 2).mean() for x, y in batches) / len(batches)


def trainer(layer, data_parallel):
    """One step: loss, gradients (reduced by DataParallel), clipping to norm 0.5, AdamW."""
    params = [q for _, q in p.named_parameters(layer) if q.requires_grad]
    if TORCH:
        import torch

        optimizer = torch.optim.AdamW(params, lr=1e-2)

        def step(batches):
            loss = mean_loss(layer, batches)
            loss.backward()  # DataParallel reduces the gradients during backward
            norm = clip_grad_norm_(params, max_norm=0.5)
            optimizer.step()
            optimizer.zero_grad()
            return float(loss), float(norm)
    else:
        import mindspore

        optimizer = mindspore.nn.AdamWeightDecay(params, learning_rate=1e-2)
        loss_and_grads = mindspore.value_and_grad(lambda b: mean_loss(layer, b), None, params)

        def step(batches):
            loss, grads = loss_and_grads(batches)
            if data_parallel:
                grads = reduce_gradients(layer, grads, params)  # the one explicit call MindSpore needs
            grads, norm = clip_grads(grads, params, max_norm=0.5)
            optimizer(grads)
            return float(loss.asnumpy()), float(norm.asnumpy())
    return step


step, ref_step = trainer(model, True), trainer(reference, False)
for i in range(4):
    loss, norm = step([batch(i, rank)])
    ref_loss, ref_norm = ref_step([batch(i, r) for r in range(world)])
    losses = p.all_reduce(p.tensor([loss]), op="avg")  # the mean of the ranks' losses is the global batch's
    mean = float(p.tolist(losses)[0])
    if rank == 0:
        print(f"step {i}: loss {mean:.6f} (one process {ref_loss:.6f}), gradient norm {norm:.6f} ({ref_norm:.6f})")
    if abs(mean - ref_loss) > 1e-5 * ref_loss or abs(norm - ref_norm) > 1e-5 * ref_norm:
        raise SystemExit(f"rank {rank}: step {i} differs from one process")
for (name, q), (_, r) in zip(p.named_parameters(model), p.named_parameters(reference)):
    full = full_parameter(q) if get_parameter_spec(q) is not None else q
    got, want = np.array(p.tolist(full)), np.array(p.tolist(r))
    if np.linalg.norm(got - want) > 1e-5 * np.linalg.norm(want):
        raise SystemExit(f"rank {rank}: {name} differs from one process after training")
print(f"rank {rank}: dp x ep training with {'AdamW' if TORCH else 'AdamWeightDecay'} and clipping matches one process")
