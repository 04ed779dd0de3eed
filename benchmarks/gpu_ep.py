"""Expert parallelism on CUDA/NCCL, measured side by side in one run: checks first, then timings.

    python -m hyper_parallel.launch --nproc N --backend torch benchmarks/gpu_ep.py [--shapes deepseek,qwen]
        [--layout ep|etp] [--tp 2] [--parts permute,comm,layer]

For each shape (DeepSeek-V3-like and Qwen3-30B-A3B-like, 4096 tokens per rank, top-8), on every rank:

1. checks: the index-build variants equal the neutral reference exactly; ``torch._grouped_mm`` (bf16, uneven and
   empty groups) against an fp32 loop, forward and backward; the whole experts layer (ExpertParallel + GroupedExperts)
   against the seed algorithm (``seed_reference.py``) in bf16 at full size and in fp32 at 8 experts per rank; how
   many device-to-host syncs one dispatch + combine makes (``torch.cuda.set_sync_debug_mode``);
2. timings (CUDA events after warm-up, a barrier before each timed region, median of many, max over ranks): the
   device copy of the received rows (the floor); the permute step (index build + gather), its parts, and a one-kernel
   prototype of it; EP dispatch + combine against a raw ``all_to_all_single`` pair of the same bytes; the experts
   layer forward + backward, ours against the seed algorithm, with other expert GEMMs, and the experts alone.

Dispatch and combine are also timed alone, each against the raw ``all_to_all_single`` of its direction, and reported
as bandwidth: bytes one rank sends + receives in the token all-to-all (rows x hidden x 2, bf16) / time, and as a share
of the raw call's (raw time / our time).

``--layout etp --tp T`` runs the same measurements with ExpertTensorParallel on a (world/T, T) ("ep", "tp") mesh: the
ranks of a tp line hold the same tokens, experts are split over ep and each expert's hidden dimension over tp;
the reference is the seed algorithm over the ep axis with full-hidden experts. Its combine adds a tp all-reduce of
the received rows, timed alone and inside the raw sequences. ``--parts`` picks the timed parts (permute, comm,
layer); the checks always run.

Rank 0 prints the tables last and writes every number to ``$OUT/gpu_ep_w<N>.json`` (``gpu_etp_w<N>_ep<E>tp<T>.json``
for ETP; a ``_<parts>`` suffix when not all parts ran) under ``--out`` or ``$OUT`` or ``.``.

The shapes, the device and the measuring (``Clock``, ``rel_err``, ...) are in ``gpu_common.py``, shared with the other
GPU benchmarks; the tables are built and printed by ``gpu_ep_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]
os.environ.setdefault("HYPER_PARALLEL_PLATFORM", "torch")

import gpu_common as common  # noqa: E402  (the device lives here: read and set as common.DEV, never copied)
import seed_reference as seed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from gpu_common import BF16, SHAPES, Clock, Shape, back_to_back, guarded, rel_err, release, syncs_of  # noqa: E402
from gpu_ep_report import BANDWIDTH, bandwidth_rows, print_table, summary_rows  # noqa: E402

from hyper_parallel import ExpertParallel, get_platform, init_device_mesh  # noqa: E402
from hyper_parallel.expert_parallel import ExpertTensorParallel  # noqa: E402
from hyper_parallel.expert_parallel.dispatch import token_combine, token_dispatch  # noqa: E402
from hyper_parallel.expert_parallel.permute import build_permute_indices, permute, unpermute  # noqa: E402
from hyper_parallel.kernels import Kernels  # noqa: E402
from hyper_parallel.moe.experts import swiglu_experts  # noqa: E402
from hyper_parallel.moe.torch import GroupedExperts  # noqa: E402
from platform_adapters import torch as adapter  # noqa: E402

# ---------------------------------------------------------------------- prototype: the permute step in one kernel
# Not in the package: permute.py gathers through an index (an index build, a concatenated zero row and a gather,
# each launched from the host). Every (rank, expert) block of rows is contiguous on both sides, so the whole step is
# R*E contiguous row copies whose offsets come from the counts alone; this kernel measures what a fused
# ``permute_rows`` member of the contract would reach (align 1: no padding slots).
if adapter.triton is not None:
    tl = adapter.tl

    @adapter.triton.jit
    def _fused_permute_kernel(x_ptr, y_ptr, counts_ptr, num_blocks, D, NUM_LOCAL_EXPERTS: tl.constexpr,
                              CHUNK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
        block = tl.program_id(0)
        expert, rank = block % NUM_LOCAL_EXPERTS, block // NUM_LOCAL_EXPERTS
        lane = tl.arange(0, CHUNK)
        src = tl.zeros([CHUNK], dtype=tl.int64)
        dst = tl.zeros([CHUNK], dtype=tl.int64)
        for first in range(0, num_blocks, CHUNK):
            idx = first + lane
            n = tl.load(counts_ptr + idx, mask=idx < num_blocks, other=0).to(tl.int64)
            e, r = idx % NUM_LOCAL_EXPERTS, idx // NUM_LOCAL_EXPERTS
            src += tl.where(idx < block, n, 0)
            dst += tl.where((e < expert) | ((e == expert) & (r < rank)), n, 0)
        src_start, dst_start = tl.sum(src, axis=0), tl.sum(dst, axis=0)
        count = tl.load(counts_ptr + block).to(tl.int32)
        cols = tl.arange(0, BLOCK_D)
        for row in range(tl.program_id(1), count, SPLIT):
            src_row = x_ptr + (src_start + row) * D
            dst_row = y_ptr + (dst_start + row) * D
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                tl.store(dst_row + c, tl.load(src_row + c, mask=c < D), mask=c < D)

    #: (programs per block, columns per step, warps) tried; the fastest is reported
    FUSED_CONFIGS = ((16, 1024, 4), (32, 1024, 4), (16, 2048, 8))

    def fused_permute(x_TD, counts_RE, num_ranks: int, num_local_experts: int, config=FUSED_CONFIGS[0]):
        split, block_d, warps = config
        y = torch.empty_like(x_TD)
        blocks = num_ranks * num_local_experts
        _fused_permute_kernel[(blocks, split)](x_TD, y, counts_RE, blocks, x_TD.shape[1],
                                               NUM_LOCAL_EXPERTS=num_local_experts,
                                               CHUNK=min(1024, adapter.triton.next_power_of_2(max(blocks, 16))),
                                               SPLIT=split, BLOCK_D=block_d, num_warps=warps)
        return y
else:
    fused_permute = None


# ---------------------------------------------------------------------- the two layers
def routed_batch(shape: Shape, experts: int, rank: int, salt: int):
    """This rank's rows grouped by global expert (random top-k routing) and the rows per global expert."""
    g = torch.Generator(device=common.DEV).manual_seed(1000 * salt + rank)
    expert_ids = torch.rand(shape.tokens, experts, generator=g, device=common.DEV).topk(shape.top_k, dim=1).indices
    counts_G = torch.bincount(expert_ids.flatten(), minlength=experts)
    x_ND = torch.randn(shape.tokens * shape.top_k, shape.dim, generator=g, device=common.DEV, dtype=BF16)
    return x_ND, counts_G


def local_weights(shape: Shape, local_experts: int, rank: int, dtype=BF16):
    g = torch.Generator(device=common.DEV).manual_seed(7 + rank)
    D, H, E = shape.dim, shape.hidden, local_experts
    w1 = torch.randn(E, H, D, generator=g, device=common.DEV, dtype=dtype).mul_(D ** -0.5)
    w2 = torch.randn(E, D, H, generator=g, device=common.DEV, dtype=dtype).mul_(H ** -0.5)
    w3 = torch.randn(E, H, D, generator=g, device=common.DEV, dtype=dtype).mul_(D ** -0.5)
    return [w.requires_grad_() for w in (w1, w2, w3)]


def our_layer(experts: int, weights, mesh):
    """GroupedExperts + ExpertParallel, holding ``weights`` as its local shards. The module is built small and its
    parameters swapped after the style is applied: building the full weights on every rank only to shard them
    would need G x 3 x D x H values per rank (22.5 GB in bf16 for DeepSeek) and nothing timed depends on it."""
    layer = GroupedExperts(dim=8, hidden_dim=8, num_experts=experts)
    style = ExpertParallel()
    style.apply(layer, mesh)
    for name, w in zip(("w1", "w2", "w3"), weights):
        setattr(layer, name, torch.nn.Parameter(w.detach(), requires_grad=True))
    return layer, style


def unbind_loop_grouped_mm(x_NK, w_EKM, counts):
    """Per-expert cuBLAS products over ``w.unbind(0)``: backward stacks the expert gradients once."""
    outs = [x_e @ w_e for x_e, w_e, n in zip(x_NK.split(list(counts)), w_EKM.unbind(0), counts) if n]
    return torch.cat(outs)


def fwd_bwd(layer_fn, x, counts_G, gy, params):
    x = x.detach().requires_grad_()
    out = layer_fn(x, counts_G)
    grads = torch.autograd.grad(out, [x, *params], gy)
    return out, grads


def time_permute_step(p, clock, args, counts_RE, host_RE, R: int, E: int, T: int, D: int, offsets, impls,
                      checks: dict, times: dict) -> None:
    """The device copy of the received rows (the floor) and the permute step (index build + gather) of an
    ``R``-rank EP group with ``E`` local experts, its parts, and the one-kernel prototype."""
    world = R
    xs_T = [torch.randn(T, D, device=common.DEV, dtype=BF16) for _ in range(3)]  # rotated: 3 x T x D >> L2
    dst = torch.empty_like(xs_T[0])
    it = iter(range(1 << 30))
    pick = lambda: xs_T[next(it) % 3]  # noqa: E731
    n_it, n_w = args.iters, args.warmup
    times["copy_floor"] = clock.time(lambda: dst.copy_(pick()), n_it, n_w)
    times["copy_floor"]["bytes"] = 2 * T * D * 2
    p.kernels.permute_rows_impl = "gather"  # the index-based step and its parts; the package's fused step below
    idx = build_permute_indices(counts_RE, host_RE, world, E)
    times["gather_only"] = clock.time(lambda: pick()[idx.source_row_P], n_it, n_w)
    for impl in ("neutral", *impls):
        p.kernels.permute_slots_impl = impl
        times[f"index_build_{impl}"] = clock.time(lambda: p.kernels.permute_slots(counts_RE, world, E, T, offsets),
                                                  n_it, n_w)
    p.kernels.permute_slots_impl = "auto"
    times["build_permute_indices"] = clock.time(lambda: build_permute_indices(counts_RE, host_RE, world, E),
                                                n_it, n_w)
    step = lambda: permute(pick(), build_permute_indices(counts_RE, host_RE, world, E))  # noqa: E731
    times["permute_step_package_gather"] = clock.time(step, n_it, n_w)
    times["permute_step_no_cat"] = clock.time(
        lambda: pick()[build_permute_indices(counts_RE, host_RE, world, E).source_row_P], n_it, n_w)
    times["permute_step_package_gather_back_to_back"] = back_to_back(clock, step, 10, 2)
    want = permute(xs_T[0], idx)
    p.kernels.permute_rows_impl = "auto"  # the package's default on CUDA: the Triton block copy
    fused_idx = build_permute_indices(counts_RE, host_RE, world, E)
    checks["permute_step_package_fused"] = fused_idx.fused
    checks["permute_step_package_equal"] = bool(torch.equal(permute(xs_T[0], fused_idx), want))
    checks["unpermute_package_equal"] = bool(torch.equal(unpermute(want, fused_idx), xs_T[0]))
    times["permute_step_package"] = clock.time(step, n_it, n_w)
    if fused_permute is not None and common.DEV.type == "cuda":
        best = None
        for config in FUSED_CONFIGS:
            fused = lambda: fused_permute(pick(), counts_RE, world, E, config)  # noqa: E731
            checks[f"fused_permute_prototype_equal_{config}"] = bool(
                torch.equal(fused_permute(xs_T[0], counts_RE, world, E, config), want))
            key = f"permute_step_fused_prototype_{config}"
            times[key] = clock.time(fused, n_it, n_w)
            times[key + "_back_to_back"] = back_to_back(clock, fused, 10, 2)
            if best is None or times[key]["us"] < times[best]["us"]:
                best = key
        times["permute_step_fused_prototype"] = dict(times[best], config=best)
        times["permute_step_fused_prototype_back_to_back"] = times[best + "_back_to_back"]
    del want
    times["copy_floor_back_to_back"] = back_to_back(clock, lambda: dst.copy_(pick()), 10, 2)
    times["gather_only_back_to_back"] = back_to_back(clock, lambda: pick()[idx.source_row_P], 10, 2)
    times["permute_step_package_back_to_back"] = back_to_back(
        clock, lambda: permute(pick(), build_permute_indices(counts_RE, host_RE, world, E)), 10, 2)
    p.kernels.permute_rows_impl = args.permute_rows
    del xs_T, dst


def a2a_bytes_of(send, recv, me: int, D: int, elem: int = 2) -> dict:
    """Bytes one rank sends plus receives in a token all-to-all of ``D``-wide rows of ``elem`` bytes (``send[j]`` /
    ``recv[j]``: rows to / from group rank ``j``; ``me``: this rank's index in the group): every row handed to or
    returned by ``all_to_all_single`` (``all``), and without the rank's own chunk, which never leaves the GPU
    (``off_rank``)."""
    return {"all": (sum(send) + sum(recv)) * D * elem,
            "off_rank": (sum(send) - send[me] + sum(recv) - recv[me]) * D * elem}


def a2a_bytes(p, send, recv, me: int, D: int, elem: int = 2) -> dict:
    """:func:`a2a_bytes_of`, averaged over the ranks of the world."""
    mine = a2a_bytes_of(send, recv, me, D, elem)
    avg = p.all_reduce(torch.tensor([mine["all"], mine["off_rank"]], dtype=torch.float64, device=common.DEV), "avg")
    return {"all": float(avg[0]), "off_rank": float(avg[1])}


def time_exchange(p, clock, args, x_ND, send, recv, me: int, group, dispatch, combine, res: dict,
                  tp_group=None) -> None:
    """Dispatch alone, combine alone and both, each against raw ``all_to_all_single`` calls moving the same rows in
    the same group (``group``: a torch ProcessGroup; ``None`` is the world). With ``tp_group`` (ETP), also the TP
    all-reduce of the received rows that the ETP combine adds, alone and in the raw sequences."""
    times, n_it, n_w = res["times"], args.iters, args.warmup
    D, T = x_ND.shape[1], sum(recv)
    buf_T = torch.zeros(T, D, device=common.DEV, dtype=BF16)  # zeros: the in-place all-reduce below keeps them finite
    buf_N = torch.empty_like(x_ND)
    raw_dispatch = lambda: dist.all_to_all_single(buf_T, x_ND, recv, send, group=group)  # noqa: E731
    raw_combine = lambda: dist.all_to_all_single(buf_N, buf_T, send, recv, group=group)  # noqa: E731
    if tp_group is not None:
        reduce_T = lambda: dist.all_reduce(buf_T, group=tp_group)  # noqa: E731
        times["raw_tp_all_reduce"] = clock.time(reduce_T, n_it, n_w)
        times["raw_all_to_all_combine_bare"] = clock.time(raw_combine, n_it, n_w)
        plain_combine = raw_combine
        raw_combine = lambda: (reduce_T(), plain_combine())  # noqa: E731
    times["raw_all_to_all_dispatch"] = clock.time(raw_dispatch, n_it, n_w)
    times["raw_all_to_all_combine"] = clock.time(raw_combine, n_it, n_w)
    times["raw_all_to_all_pair"] = clock.time(lambda: (raw_dispatch(), raw_combine()), n_it, n_w)
    nbytes = a2a_bytes(p, send, recv, me, D)
    res["a2a_bytes_per_rank"] = nbytes
    times["raw_all_to_all_pair"]["bytes_per_rank"] = 2 * nbytes["all"]
    del buf_T, buf_N
    d = dispatch()
    times["dispatch_ours"] = clock.time(dispatch, n_it, n_w)
    times["combine_ours"] = clock.time(lambda: combine(d), n_it, n_w)
    times["dispatch_combine_ours"] = clock.time(lambda: combine(dispatch()), n_it, n_w)
    del d


# ---------------------------------------------------------------------- one shape
def run_shape(name: str, shape: Shape, args, p, mesh, clock) -> dict:
    rank, world = p.get_rank(), p.get_world_size()
    G, E, D = shape.experts, shape.experts // world, shape.dim
    res = {"layout": "ep", "shape": dataclasses.asdict(shape), "local_experts": E, "checks": {}, "times": {}}
    checks, times = res["checks"], res["times"]

    x_ND, counts_G = routed_batch(shape, G, rank, salt=1)
    gy = torch.randn_like(x_ND)
    weights = local_weights(shape, E, rank)
    layer, style = our_layer(G, weights, mesh)
    params = [layer.w1, layer.w2, layer.w3]

    # ---- index build variants, exact, on this rank's real counts
    counts_RE, _ = p.all_to_all_single(counts_G, output_split_sizes=[E] * world, input_split_sizes=[E] * world)
    host_RE = p.tolist(counts_RE)
    T = sum(host_RE)
    res["rows_received"] = T
    offsets = p.tensor([sum(sum(host_RE[e::E]) for e in range(k)) for k in range(E)], dtype="int64")
    p.kernels.permute_slots_impl = "neutral"
    ref_slots = p.kernels.permute_slots(counts_RE, world, E, T, offsets)
    impls = ("eager", "graph", "triton") if common.DEV.type == "cuda" else ("eager",)
    for impl in impls:
        p.kernels.permute_slots_impl = impl
        got = p.kernels.permute_slots(counts_RE, world, E, T, offsets)
        checks[f"index_build_{impl}_equal"] = bool(torch.equal(got, ref_slots))
    p.kernels.permute_slots_impl = "auto"
    checks["index_build_auto_choice"] = adapter.choose_permute_impl(
        "auto", common.DEV.type, triton_usable=adapter.triton is not None, capturing=False,
        broken=p.kernels._broken_impls)

    # ---- grouped_mm: bf16 kernel vs fp32 loop with uneven and empty groups, forward and backward
    gm_counts = [0, 37, 0, 1001, 5, 0, 3000, 1]
    xg = torch.randn(sum(gm_counts), shape.dim, device=common.DEV, dtype=BF16)
    wg = (torch.randn(len(gm_counts), shape.hidden, shape.dim, device=common.DEV, dtype=BF16) * shape.dim ** -0.5).mT
    checks["grouped_mm_fast_path"] = adapter.grouped_mm_device_ok(xg.device) and adapter.grouped_mm_layout_ok(xg, wg)
    gyg = torch.randn(sum(gm_counts), shape.hidden, device=common.DEV)
    outs = []
    for fn, dt in ((lambda a, b: p.kernels.grouped_mm(a, b, gm_counts), BF16),
                   (lambda a, b: Kernels.grouped_mm(p.kernels, a, b, gm_counts), torch.float32)):
        a, b = xg.detach().to(dt).requires_grad_(), wg.detach().to(dt).requires_grad_()
        y = fn(a, b)
        outs.append((y, *torch.autograd.grad(y, [a, b], gyg.to(dt))))
    for what, got, want in zip(("out", "dx", "dw"), outs[0], outs[1]):
        checks[f"grouped_mm_{what}_rel_err"] = rel_err(got, want)
    empty = [e for e, n in enumerate(gm_counts) if n == 0]
    checks["grouped_mm_empty_expert_grad_zero"] = bool(outs[0][2][empty].abs().max() == 0)
    del outs, xg, wg

    # ---- whole layer, full size: ours (bf16) against the seed algorithm (bf16). Weight gradients are compared on
    # the first 16 local experts: two full sets beside the weights do not fit an 80 GB GPU at DeepSeek size.
    seed_fn = lambda x, c: seed.seed_moe_experts(x, c, *weights)  # noqa: E731
    out, grads = fwd_bwd(layer, x_ND, counts_G, gy, params)
    kept = [out, grads[0]] + [g[:16].clone() for g in grads[1:]]
    del out, grads
    out, grads = fwd_bwd(seed_fn, x_ND, counts_G, gy, weights)
    for what, got, want in zip(("out", "dx", "dw1[:16]", "dw2[:16]", "dw3[:16]"), kept, [out, *grads]):
        checks[f"layer_bf16_vs_seed_bf16_{what}_rel_err"] = rel_err(got, want[:len(got)])
    del kept, out, grads
    release()

    # ---- whole layer against an fp32 reference, at 8 experts per rank (fp32 weights of every expert do not fit)
    small = dataclasses.replace(shape, experts=8 * world)
    xs, cs = routed_batch(small, small.experts, rank, salt=2)
    gys = torch.randn_like(xs)
    ws = local_weights(small, 8, rank)
    small_layer, _ = our_layer(small.experts, ws, mesh)
    ws32 = [w.detach().float().requires_grad_() for w in ws]
    got = fwd_bwd(small_layer, xs, cs, gys, [small_layer.w1, small_layer.w2, small_layer.w3])
    want = fwd_bwd(lambda x, c: seed.seed_moe_experts(x, c, *ws32), xs.float(), cs, gys.float(), ws32)
    seed16 = fwd_bwd(lambda x, c: seed.seed_moe_experts(x, c, *ws), xs, cs, gys, ws)
    for what, a, b, c in zip(("out", "dx", "dw1", "dw2", "dw3"), (got[0], *got[1]), (want[0], *want[1]),
                             (seed16[0], *seed16[1])):
        checks[f"layer8_ours_bf16_vs_fp32_{what}_rel_err"] = rel_err(a, b)
        checks[f"layer8_seed_bf16_vs_fp32_{what}_rel_err"] = rel_err(c, b)
    del got, want, seed16, small_layer, ws, ws32, xs, gys

    # ---- device-to-host syncs of one dispatch + combine
    def ours_dc(x=x_ND):
        d = style.dispatch(x, counts_G, mesh)
        return style.combine(d.routed_input, d.meta, mesh)

    def seed_dc(x=x_ND):
        permuted, _, state = seed.seed_dispatch(x, counts_G)
        return seed.seed_combine(permuted, state)

    ours_dc(), seed_dc()  # warm (Triton compile, NCCL connections)
    for who, fn in (("ours", ours_dc), ("seed", seed_dc)):
        where = syncs_of(fn)
        if where is not None:
            checks[f"dispatch_combine_syncs_{who}"] = [len(w) for w in where]
            checks[f"dispatch_combine_sync_sites_{who}"] = sorted(set(sum(where, [])))
    checks["dispatch_combine_roundtrip_exact"] = bool(torch.equal(ours_dc(), x_ND))
    release()

    # ---- timings: copy floor and the permute step
    if "permute" in args.parts:
        time_permute_step(p, clock, args, counts_RE, host_RE, world, E, T, shape.dim, offsets, impls, checks,
                          times)

    # ---- dispatch and combine, alone and together, against raw all_to_all_single calls of the same rows
    send = [int(s) for s in counts_G.view(world, E).sum(1).tolist()]
    recv = [int(s) for s in counts_RE.view(world, E).sum(1).tolist()]
    if "comm" in args.parts:
        time_exchange(p, clock, args, x_ND, send, recv, rank, None,
                      lambda: style.dispatch(x_ND, counts_G, mesh),
                      lambda d: style.combine(d.routed_input, d.meta, mesh), res)
        times["dispatch_combine_seed"] = clock.time(seed_dc, args.iters, args.warmup)
        release()
    if "layer" not in args.parts:
        del layer, weights, params, x_ND, gy
        release()
        return res

    # ---- experts layer forward + backward
    times["layer_fwd_bwd_ours"] = guarded(clock, lambda: fwd_bwd(layer, x_ND, counts_G, gy, params),
                                          args.layer_iters, 2)
    release()
    times["layer_fwd_bwd_seed"] = guarded(clock, lambda: fwd_bwd(seed_fn, x_ND, counts_G, gy, weights),
                                          args.layer_iters, 2)
    release()
    # our layer with other expert GEMMs: a cuBLAS loop over unbound weights (the seed's), and the neutral loop
    # (indexes w[e]: each expert's backward writes a full-size gradient; too slow to time at DeepSeek size)
    variants = {"unbind_loop": unbind_loop_grouped_mm}
    if name != "deepseek":
        variants["neutral_loop"] = lambda x, w, c: Kernels.grouped_mm(p.kernels, x, w, c)
    for variant, fn in variants.items():
        p.kernels.grouped_mm = fn
        try:
            times[f"layer_fwd_bwd_ours_{variant}_experts"] = guarded(
                clock, lambda: fwd_bwd(layer, x_ND, counts_G, gy, params), 3 if variant == "neutral_loop" else
                args.layer_iters, 1)
        finally:
            del p.kernels.grouped_mm
        release()

    # the experts alone (already permuted rows), forward + backward: where the layer's time goes
    tokens_per_expert = [sum(host_RE[e::E]) for e in range(E)]
    x_TD = torch.randn(T, D, device=common.DEV, dtype=BF16)
    gy_TD = torch.randn_like(x_TD)
    ours_experts = lambda x, c: swiglu_experts(x, tokens_per_expert, *weights)  # noqa: E731
    seed_experts = lambda x, c: seed.seed_experts(x, torch.tensor(tokens_per_expert), *weights)  # noqa: E731
    times["experts_fwd_bwd_ours"] = guarded(clock, lambda: fwd_bwd(ours_experts, x_TD, None, gy_TD, weights),
                                            args.layer_iters, 2)
    times["experts_fwd_bwd_seed_loop"] = guarded(clock, lambda: fwd_bwd(seed_experts, x_TD, None, gy_TD, weights),
                                                 args.layer_iters, 2)
    del x_TD, gy_TD
    flops = 3 * 2 * 3 * T * shape.dim * shape.hidden  # 3 GEMMs, forward and twice that in backward
    res["layer_tflops_ours"] = flops / times["layer_fwd_bwd_ours"]["us"] / 1e6
    del layer, weights, params, x_ND, gy
    release()
    return res


# ---------------------------------------------------------------------- one shape, expert + tensor parallel
def tp_slices(ws, tp_rank: int, tp: int) -> list:
    """This TP rank's slices (views) of full-hidden ``[w1 [E, H, D], w2 [E, D, H], w3 [E, H, D]]`` (weights or
    their gradients): H split in ``tp`` equal blocks, the placements ``ExpertTensorParallel`` gives them."""
    w1, w2, w3 = ws
    h = w1.shape[1] // tp
    cut = slice(tp_rank * h, (tp_rank + 1) * h)
    return [w1[:, cut], w2[:, :, cut], w3[:, cut]]


def etp_shards(ws, tp_rank: int, tp: int) -> list:
    """:func:`tp_slices` of weights as contiguous leaf tensors that require grad."""
    return [w.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
            for w in tp_slices(ws, tp_rank, tp)]


def our_etp_layer(experts: int, shards, mesh, tp: int):
    """GroupedExperts + ExpertTensorParallel on a 2-D ("ep", "tp") mesh, holding ``shards`` as its local
    parameters (built small and swapped after the style is applied, as :func:`our_layer`)."""
    layer = GroupedExperts(dim=8, hidden_dim=8 * tp, num_experts=experts)
    style = ExpertTensorParallel()
    style.apply(layer, mesh)
    for name, w in zip(("w1", "w2", "w3"), shards):
        setattr(layer, name, torch.nn.Parameter(w.detach(), requires_grad=True))
    return layer, style


def run_shape_etp(name: str, shape: Shape, args, p, mesh, clock) -> dict:
    """ExpertTensorParallel on an ("ep", "tp") mesh: the experts split over ``ep``, each expert's hidden dimension
    over ``tp``. The ranks of one tp line hold the same tokens (``shape.tokens`` per rank, as after a
    tensor-parallel attention block); the reference is the seed algorithm over the ep axis with full-hidden
    experts, which every rank of a tp line computes whole."""
    ep_mesh, tp_mesh = mesh["ep"], mesh["tp"]
    R, TP = ep_mesh.size(), tp_mesh.size()
    ep_rank, tp_rank = mesh.get_local_rank("ep"), mesh.get_local_rank("tp")
    ep_group, tp_group = ep_mesh.get_group(), tp_mesh.get_group()
    G, E, D = shape.experts, shape.experts // R, shape.dim
    res = {"layout": "etp", "mesh": [R, TP], "shape": dataclasses.asdict(shape), "local_experts": E,
           "local_hidden": shape.hidden // TP, "checks": {}, "times": {}}
    checks, times = res["checks"], res["times"]

    def same_along_tp(like, salt):  # seeded by the ep coordinate: equal on the ranks of a tp line
        g = torch.Generator(device=common.DEV).manual_seed(1000 * salt + 500 + ep_rank)
        return torch.randn(like.shape, generator=g, device=common.DEV, dtype=like.dtype)

    x_ND, counts_G = routed_batch(shape, G, ep_rank, salt=1)
    gy = same_along_tp(x_ND, 1)
    full = local_weights(shape, E, ep_rank)  # this ep rank's experts, full hidden: the reference's weights
    shards = etp_shards(full, tp_rank, TP)
    layer, style = our_etp_layer(G, shards, mesh, TP)
    params = [layer.w1, layer.w2, layer.w3]

    # ---- index build variants, exact, on this rank's real counts (R = the ep degree)
    counts_RE, _ = p.all_to_all_single(counts_G, output_split_sizes=[E] * R, input_split_sizes=[E] * R,
                                       group=ep_group)
    host_RE = p.tolist(counts_RE)
    T = sum(host_RE)
    res["rows_received"] = T
    offsets = p.tensor([sum(sum(host_RE[e::E]) for e in range(k)) for k in range(E)], dtype="int64")
    p.kernels.permute_slots_impl = "neutral"
    ref_slots = p.kernels.permute_slots(counts_RE, R, E, T, offsets)
    impls = ("eager", "graph", "triton") if common.DEV.type == "cuda" else ("eager",)
    for impl in impls:
        p.kernels.permute_slots_impl = impl
        checks[f"index_build_{impl}_equal"] = bool(torch.equal(p.kernels.permute_slots(counts_RE, R, E, T, offsets),
                                                               ref_slots))
    p.kernels.permute_slots_impl = "auto"

    # ---- whole layer, full size: ours (bf16, ETP) against the seed algorithm over ep (bf16, full hidden); weight
    # gradients: our shard against the same slice of the reference's, first 16 local experts
    seed_fn = lambda x, c: seed.seed_moe_experts(x, c, *full, group=ep_group.native)  # noqa: E731
    out, grads = fwd_bwd(layer, x_ND, counts_G, gy, params)
    kept = [out, grads[0]] + [g[:16].clone() for g in grads[1:]]
    del out, grads
    out, grads = fwd_bwd(seed_fn, x_ND, counts_G, gy, full)
    want = [out, grads[0]] + [g[:16] for g in tp_slices(grads[1:], tp_rank, TP)]
    for what, got, ref in zip(("out", "dx", "dw1[:16]", "dw2[:16]", "dw3[:16]"), kept, want):
        checks[f"layer_bf16_vs_seed_bf16_{what}_rel_err"] = rel_err(got, ref)
    del kept, want, out, grads
    release()

    # ---- whole layer against an fp32 reference, at 8 experts per ep rank
    small = dataclasses.replace(shape, experts=8 * R)
    xs, cs = routed_batch(small, small.experts, ep_rank, salt=2)
    gys = same_along_tp(xs, 2)
    ws = local_weights(small, 8, ep_rank)
    small_layer, _ = our_etp_layer(small.experts, etp_shards(ws, tp_rank, TP), mesh, TP)
    ws32 = [w.detach().float().requires_grad_() for w in ws]
    got = fwd_bwd(small_layer, xs, cs, gys, [small_layer.w1, small_layer.w2, small_layer.w3])
    want = fwd_bwd(lambda x, c: seed.seed_moe_experts(x, c, *ws32, group=ep_group.native), xs.float(), cs,
                   gys.float(), ws32)
    seed16 = fwd_bwd(lambda x, c: seed.seed_moe_experts(x, c, *ws, group=ep_group.native), xs, cs, gys, ws)
    flat = lambda r: (r[0], r[1][0], *tp_slices(r[1][1:], tp_rank, TP))  # noqa: E731
    for what, a, b, c in zip(("out", "dx", "dw1", "dw2", "dw3"), (got[0], *got[1]), flat(want), flat(seed16)):
        checks[f"layer8_ours_bf16_vs_fp32_{what}_rel_err"] = rel_err(a, b)
        checks[f"layer8_seed_bf16_vs_fp32_{what}_rel_err"] = rel_err(c, b)
    del got, want, seed16, small_layer, ws, ws32, xs, gys

    # ---- device-to-host syncs of one dispatch + combine; the round trip (combine sums the tp line's copies)
    dispatch = lambda: style.dispatch(x_ND, counts_G, mesh)  # noqa: E731
    combine = lambda d: style.combine(d.routed_input, d.meta, mesh)  # noqa: E731
    combine(dispatch())  # warm
    where = syncs_of(lambda: combine(dispatch()))
    if where is not None:
        checks["dispatch_combine_syncs_ours"] = [len(w) for w in where]
        checks["dispatch_combine_sync_sites_ours"] = sorted(set(sum(where, [])))
    checks["dispatch_combine_roundtrip_exact_tp_times_input"] = bool(torch.equal(combine(dispatch()), x_ND * TP))
    release()

    # ---- timings
    if "permute" in args.parts:
        time_permute_step(p, clock, args, counts_RE, host_RE, R, E, T, D, offsets, impls, checks, times)
    send = [int(s) for s in counts_G.view(R, E).sum(1).tolist()]
    recv = [int(s) for s in counts_RE.view(R, E).sum(1).tolist()]
    if "comm" in args.parts:
        time_exchange(p, clock, args, x_ND, send, recv, ep_rank, ep_group.native, dispatch, combine, res,
                      tp_group=tp_group.native)
        release()
    if "layer" in args.parts:
        times["layer_fwd_bwd_ours"] = guarded(clock, lambda: fwd_bwd(layer, x_ND, counts_G, gy, params),
                                              args.layer_iters, 2)
        release()
        times["layer_fwd_bwd_seed"] = guarded(clock, lambda: fwd_bwd(seed_fn, x_ND, counts_G, gy, full),
                                              args.layer_iters, 2)
        release()
        # EP alone on the ep axis with full-hidden experts (what ExpertParallel runs; each rank of a tp line then
        # repeats the work). Built from token_dispatch / token_combine: ExpertParallel.apply on the mesh["ep"]
        # sub-mesh fails on ranks outside rank 0's line ("src_data_rank 0 is not in the mesh").
        def ep_only(x, c):
            d = token_dispatch(x, c, ep_group)
            return token_combine(swiglu_experts(d.routed_input, d.num_tokens_per_expert, *full), d.meta)

        times["layer_fwd_bwd_ep_only_full_hidden"] = guarded(
            clock, lambda: fwd_bwd(ep_only, x_ND, counts_G, gy, full), args.layer_iters, 2)
        release()
        tokens_per_expert = [sum(host_RE[e::E]) for e in range(E)]
        x_TD = torch.randn(T, D, device=common.DEV, dtype=BF16)
        gy_TD = torch.randn_like(x_TD)
        for key, ws_ in (("experts_fwd_bwd_ours", shards), ("experts_fwd_bwd_full_hidden", full)):
            times[key] = guarded(clock, lambda: fwd_bwd(lambda x, c: swiglu_experts(x, tokens_per_expert, *ws_),
                                                        x_TD, None, gy_TD, ws_), args.layer_iters, 2)
        del x_TD, gy_TD
        flops = 3 * 2 * 3 * T * shape.dim * (shape.hidden // TP)
        res["layer_tflops_ours"] = flops / times["layer_fwd_bwd_ours"]["us"] / 1e6
    del layer, full, shards, params, x_ND, gy
    release()
    return res


def worst_over_ranks(p, checks: dict) -> None:
    """Replace each float check by its maximum over ranks and each boolean by its conjunction (in place)."""
    keys = [k for k, v in checks.items() if isinstance(v, (bool, float))]
    if not keys:
        return
    vals = [(0.0 if checks[k] else 1.0) if isinstance(checks[k], bool) else checks[k] for k in keys]
    worst = p.all_reduce(torch.tensor(vals, dtype=torch.float64, device=common.DEV), "max").tolist()
    for k, w in zip(keys, worst):
        checks[k] = (w == 0.0) if isinstance(checks[k], bool) else w


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="deepseek,qwen", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--layout", choices=("ep", "etp"), default="ep",
                    help="ep: ExpertParallel on a 1-D mesh of every rank; etp: ExpertTensorParallel on a 2-D "
                         "(ep, tp) mesh of world/tp x tp ranks")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of --layout etp")
    ap.add_argument("--parts", default="permute,comm,layer",
                    help="comma-separated timed parts: permute, comm, layer (the checks always run)")
    ap.add_argument("--iters", type=int, default=50, help="timed repetitions of the copy/permute/dispatch steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layer-iters", type=int, default=10, help="timed repetitions of the layer forward+backward")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON report")
    ap.add_argument("--permute-rows", choices=("auto", "gather"), default="auto",
                    help="how dispatch moves rows in the comm and layer parts: auto (the package's default: the "
                         "Triton block copy on CUDA) or gather (through an index, as before it); an A/B switch")
    args = ap.parse_args(argv)
    args.parts = set(args.parts.split(","))
    unknown = args.parts - {"permute", "comm", "layer"}
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}")

    p = get_platform()
    p.init_process_group()
    p.kernels.permute_rows_impl = args.permute_rows
    rank, world = p.get_rank(), p.get_world_size()
    common.DEV = p.device
    if args.layout == "etp":
        if args.tp < 1 or world % args.tp:
            ap.error(f"--tp {args.tp} must divide the world size {world}")
        mesh = init_device_mesh(common.DEV.type, (world // args.tp, args.tp), mesh_dim_names=("ep", "tp"))
        runner, stem = run_shape_etp, f"gpu_etp_w{world}_ep{world // args.tp}tp{args.tp}"
    else:
        mesh = init_device_mesh(common.DEV.type, (world,), mesh_dim_names=("ep",))
        runner, stem = run_shape, f"gpu_ep_w{world}"
    if args.parts != {"permute", "comm", "layer"}:
        stem += "_" + "-".join(sorted(args.parts))
    if args.permute_rows != "auto":
        stem += "_" + args.permute_rows
    clock = Clock(p)
    report = {"device": torch.cuda.get_device_name() if common.DEV.type == "cuda" else "cpu", "world": world,
              "layout": args.layout, "versions": p.versions(),
              "triton": getattr(adapter.triton, "__version__", None),
              "date": datetime.date.today().isoformat(), "argv": sys.argv, "bandwidth": BANDWIDTH, "shapes": {}}
    rows, bw_rows = [], []
    for name in args.shapes.split(","):
        r = runner(name, SHAPES[name], args, p, mesh, clock)
        worst_over_ranks(p, r["checks"])
        report["shapes"][name] = r
        rows += summary_rows(name, r, world)
        bw_rows += bandwidth_rows(name, r, world)
        if rank == 0:
            print(f"[{name}] done: {json.dumps(r['checks'])}", flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, stem + ".json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\n{report['device']} x{world}, layout {args.layout}, torch {report['versions'].get('torch')}, "
              f"triton {report['triton']}; full numbers in {path}")
        print_table(rows, {n: r["checks"] for n, r in report["shapes"].items()}, bw_rows)
    p.barrier()
    p.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
