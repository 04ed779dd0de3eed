"""The quickstart's MoE layer under expert parallelism, checked against the same layer on one process.

    python -m hyper_parallel.launch --nproc 2 -m hyper_parallel.examples.moe_expert_parallel
    python -m hyper_parallel.launch --nproc 2 --backend mindspore -m hyper_parallel.examples.moe_expert_parallel

Every rank builds ``MoE(..., seed=0)`` twice: the same initial weights on every rank and framework. One copy stays
whole (the single-process reference); the other gets ``ExpertParallel`` over all ranks, so each rank keeps
``num_experts / world`` experts and the routed tokens travel by all-to-all. Each rank feeds its own tokens through
the parallel layer, forward and backward, and checks against the reference run on every rank's tokens at once:

* the output for its tokens;
* the gradient of its input;
* the gradient of every expert weight, gathered over the ranks (a rank's experts are trained by all ranks' tokens).

It prints ``rank r: output OK, gradient OK`` and exits 0, or names what differs and exits 1. The world size must
divide the number of experts (8): 1, 2, 4 or 8 processes.
"""

from __future__ import annotations

import numpy as np

from hyper_parallel import DTensor, ExpertParallel, full_parameter, get_parameter_spec, get_platform, init_device_mesh
from hyper_parallel.moe import MoE

DIM, HIDDEN, EXPERTS, TOP_K = 64, 128, 8, 2  # the quickstart's layer
TOKENS_PER_RANK = 16
RTOL = 1e-4  # relative error allowed: float32, and the parallel layer sums in another order


def tokens(rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s input ``[TOKENS_PER_RANK, DIM]`` and the weights of its loss ``sum(out * w)``: seeded, so
    every rank can make every other rank's data for the reference."""
    rng = np.random.default_rng((2024, rank))
    return rng.standard_normal((TOKENS_PER_RANK, DIM)), rng.standard_normal((TOKENS_PER_RANK, DIM))


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main() -> int:
    p = get_platform()
    p.init_process_group()  # reads the launcher's environment
    rank, world = p.get_rank(), p.get_world_size()
    if EXPERTS % world:
        raise ValueError(f"the world size must divide num_experts={EXPERTS} (1, 2, 4 or 8 processes), got {world}")

    def host(t) -> np.ndarray:
        return np.asarray(p.tolist(t), dtype=np.float64).reshape(tuple(t.shape))

    def dev(a: np.ndarray):
        return p.tensor(a.tolist(), dtype="float32")

    # The reference: the whole layer, on every rank's tokens at once.
    ref = MoE(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, seed=0)
    ref_expert_params = [q for _, q in p.named_parameters(ref.experts)]
    all_x, all_w = (np.concatenate(parts) for parts in zip(*(tokens(r) for r in range(world))))
    _, (ref_gx,), ref_grads = p.value_and_grad(lambda t: (ref(t) * dev(all_w)).sum(), [dev(all_x)],
                                                ref_expert_params)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    want_out, want_gx = host(ref(dev(all_x)))[mine], host(ref_gx)[mine]

    # Expert parallelism: the same layer, its experts sharded over the ranks; each rank runs its own tokens.
    mesh = init_device_mesh(p.device_type, (world,), mesh_dim_names=("ep",))
    moe = MoE(dim=DIM, hidden_dim=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, seed=0)
    ExpertParallel().apply(moe.experts, mesh)  # each rank keeps EXPERTS / world experts
    names, expert_params = zip(*p.named_parameters(moe.experts))
    x, w = tokens(rank)
    out = moe(dev(x))
    _, (gx,), grads = p.value_and_grad(lambda t: (moe(t) * dev(w)).sum(), [dev(x)], list(expert_params))

    problems = []
    if (err := rel_error(host(out), want_out)) > RTOL:
        problems.append(f"output differs (relative error {err:.2e})")
    if (err := rel_error(host(gx), want_gx)) > RTOL:
        problems.append(f"input gradient differs (relative error {err:.2e})")
    for name, param, grad, ref_param, ref_grad in zip(names, expert_params, grads, ref_expert_params, ref_grads):
        spec = get_parameter_spec(param)
        # full_parameter gathers a sharded parameter; a gradient has the parameter's layout, so it gathers the same way
        full_grad = DTensor.from_local(grad, spec.device_mesh, spec.placements, shape=spec.shape).full_tensor()
        if (err := rel_error(host(full_parameter(param)), host(ref_param))) > 0:
            problems.append(f"experts.{name} differs from the reference's initial weights (relative error {err:.2e})")
        if (err := rel_error(host(full_grad), host(ref_grad))) > RTOL:
            problems.append(f"gradient of experts.{name} differs (relative error {err:.2e})")
    local_experts = [tuple(param.shape)[0] for param in expert_params]

    if problems:
        print(f"rank {rank}: MISMATCH: " + "; ".join(problems))
    else:
        print(f"rank {rank}: {local_experts[0]} of {EXPERTS} experts, {TOKENS_PER_RANK} tokens: output OK, "
              f"gradient OK")
    p.destroy_process_group()  # leave together (rank 0 hosts the rendezvous store)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
