"""The hyper_parallel seed's expert-parallel MoE experts layer, eager, on plain torch.distributed: the baseline that
``gpu_ep.py`` times our ExpertParallel + GroupedExperts against. Not part of the package.

What it reproduces of the seed (``shared/seeds/hyper_parallel_expert_parallel.py.txt``), step by step:

* dispatch: the counts all-to-all (async, then wait); the split sizes read back with two ``tolist`` calls; the
  differentiable token all-to-all; the rank-major -> expert-major index build with cumsum and two
  ``repeat_interleave`` calls sized on the host (no ``output_size``) after an ``int(total)`` read-back; a gather.
* experts: the seed hands its experts a device tensor of counts; they read it back and loop over experts with three
  matmuls each (SwiGLU). The seed's experts module is not in the seed file, so the loop follows the usual eager
  for-loop experts (torchtitan's); the weights are split with ``unbind`` so that backward stacks the expert
  gradients once (indexing ``w[e]`` per expert would make every expert's backward write a full-size gradient).
* combine: the scatter ``zeros[idx] = out`` back to rank-major order, then the reverse all-to-all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["seed_dispatch", "seed_combine", "seed_experts", "seed_moe_experts"]


class _AllToAll(torch.autograd.Function):
    """Token all-to-all whose gradient is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def _permute_indices(counts_RE, num_ranks: int, num_local_experts: int):
    """The seed's index build: for each expert-major slot, the rank-major row it reads."""
    R, E = num_ranks, num_local_experts
    counts_2d = counts_RE.view(R, E)
    tokens_per_expert = counts_2d.sum(0)
    total = int(tokens_per_expert.sum())  # a host read-back
    src_start_em = (counts_RE.cumsum(0) - counts_RE).view(R, E).t().contiguous().view(-1)
    counts_em = counts_2d.t().contiguous().view(-1)
    dst_start_em = counts_em.cumsum(0) - counts_em
    # repeat_interleave without output_size: each call reads its output length back from the GPU
    src_per_slot = src_start_em.repeat_interleave(counts_em)
    offset_in_block = torch.arange(total, device=counts_RE.device) - dst_start_em.repeat_interleave(counts_em)
    return src_per_slot + offset_in_block, tokens_per_expert


def seed_dispatch(x_ND, num_tokens_per_expert_G, group=None):
    """``(permuted rows, tokens per local expert (device), state for combine)``."""
    R = dist.get_world_size(group)
    E = num_tokens_per_expert_G.numel() // R
    counts_RE = torch.empty_like(num_tokens_per_expert_G)
    dist.all_to_all_single(counts_RE, num_tokens_per_expert_G, group=group, async_op=True).wait()
    send = num_tokens_per_expert_G.view(R, E).sum(1).tolist()
    recv = counts_RE.view(R, E).sum(1).tolist()
    received = _AllToAll.apply(x_ND, send, recv, group)
    idx, tokens_per_expert = _permute_indices(counts_RE, R, E)
    return received[idx], tokens_per_expert, (idx, received.shape, send, recv, group)


def seed_experts(x, tokens_per_expert, w1_EHD, w2_EDH, w3_EHD):
    """SwiGLU experts as a per-expert loop (the counts are read back to the host)."""
    sizes = tokens_per_expert.tolist()
    outs = []
    for x_e, w1, w2, w3 in zip(torch.split(x, sizes), w1_EHD.unbind(0), w2_EDH.unbind(0), w3_EHD.unbind(0)):
        outs.append((F.silu(x_e @ w1.t()) * (x_e @ w3.t())) @ w2.t())
    return torch.cat(outs)


def seed_combine(out, state):
    idx, shape, send, recv, group = state
    back = out.new_zeros(shape)
    back[idx] = out
    return _AllToAll.apply(back, recv, send, group)


def seed_moe_experts(x_ND, num_tokens_per_expert_G, w1_EHD, w2_EDH, w3_EHD, group=None):
    """Dispatch, local experts, combine: ``[N, D]`` rows grouped by global expert in, the same rows out."""
    permuted, tokens_per_expert, state = seed_dispatch(x_ND, num_tokens_per_expert_G, group)
    return seed_combine(seed_experts(permuted, tokens_per_expert, w1_EHD, w2_EDH, w3_EHD), state)
