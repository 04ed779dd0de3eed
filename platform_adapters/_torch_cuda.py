"""CUDA fast paths of the torch adapter, kept apart from the adapter itself: the dispatch index build (a Triton
kernel, a captured CUDA graph, eager ops without hidden syncs), the ``torch._grouped_mm`` eligibility checks, and
pinned host-to-device copies. :mod:`platform_adapters.torch` decides when each runs; every one has the neutral code
in :mod:`hyper_parallel.kernels` as its reference (``tests/test_torch_cuda_paths.py``,
``benchmarks/gpu_ep.py``).
"""

from __future__ import annotations

import array
import contextlib

import torch

try:  # optional: without Triton the CUDA index build is a captured graph
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - a broken Triton install must not break the adapter, only lose one fast path
    triton = tl = None

#: Host data up to this size goes to the GPU through pinned memory without blocking (see ``TorchPlatform.tensor``).
PINNED_COPY_MAX_BYTES = 1 << 20

#: Index builds ``TorchPlatform.permute_slots_impl`` may name; ``"auto"`` picks (see :func:`choose_permute_impl`).
PERMUTE_SLOTS_IMPLS = ("auto", "triton", "graph", "eager", "neutral")


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float64: "d", torch.float32: "f"}


def host_tensor(data, dtype):
    """``torch.tensor(data, dtype=dtype)`` on the host. A flat list of numbers (counts, offsets: what dispatch
    builds) goes through ``array.array``, several times faster than torch reading Python objects one by one."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and type(data) in (list, tuple) and data:
        try:
            return torch.frombuffer(array.array(code, data), dtype=dtype)
        except (TypeError, OverflowError):  # nested, or values the type cannot hold: torch decides as before
            pass
    return torch.tensor(data, dtype=dtype)


def host_copy_mode(device_type: str, nbytes: int) -> str:
    """How :meth:`TorchPlatform.tensor` moves host data to ``device_type``: ``"pinned"`` (non-blocking, from pinned
    memory) or ``"plain"``. On CUDA a copy from pageable memory makes the host wait for the GPU to drain, a hidden
    sync inside dispatch; from pinned memory it is queued on the stream like a kernel (the caching host allocator
    keeps the pinned block until the copy is done). Bulk data (initial weights) is copied plainly: blocking there is
    harmless and pins no memory."""
    return "pinned" if device_type == "cuda" and nbytes <= PINNED_COPY_MAX_BYTES else "plain"


# ---------------------------------------------------------------------- CUDA index build (permute_slots)
# A row's slot is its own rank-major index plus a shift that is constant over its (rank, expert) block: the block's
# destination start minus its source start. Every variant below computes that; they differ in how many launches
# and host syncs it costs.

def slot_shift_RE(counts_RE, num_ranks: int, num_local_experts: int, expert_offsets_E):
    """Destination start minus source start of every (rank, expert) block, rank-major; int64 ``[R*E]``."""
    R, E = num_ranks, num_local_experts
    counts_ER = counts_RE.reshape(R, E).t()
    dst_start_RE = (expert_offsets_E.reshape(E, 1) + counts_ER.cumsum(1) - counts_ER).t().reshape(-1)
    return dst_start_RE - (counts_RE.cumsum(0) - counts_RE)


def permute_slots_eager(counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
    """The neutral index build in 6 launches. ``output_size`` matters: without it repeat_interleave reads the
    total back from the GPU to size its output, a hidden device-to-host sync in the middle of dispatch."""
    counts_RE = counts_RE.reshape(-1)
    shift_RE = slot_shift_RE(counts_RE, num_ranks, num_local_experts, expert_offsets_E)
    return shift_RE.repeat_interleave(counts_RE, output_size=num_rows) + torch.arange(num_rows,
                                                                                      device=counts_RE.device)


def permute_slots_padded(counts_ext, num_ranks: int, num_local_experts: int, capacity: int, expert_offsets_E):
    """:func:`permute_slots_eager` over ``capacity >= T`` rows, whose shapes depend on ``capacity`` alone, so one
    captured graph serves every ``T`` up to it. ``counts_ext`` is ``counts_RE`` plus one trailing block holding the
    ``capacity - T`` extra rows; the first ``T`` entries of the result are the slots."""
    shift_RE = slot_shift_RE(counts_ext[:-1], num_ranks, num_local_experts, expert_offsets_E)
    shift_ext = torch.cat([shift_RE, shift_RE.new_zeros(1)])
    return shift_ext.repeat_interleave(counts_ext, output_size=capacity) + torch.arange(capacity,
                                                                                         device=counts_ext.device)


def graph_capacity(num_rows: int) -> int:
    """Rows a captured index build is sized for: the next power of two (at least 1024), so a training run whose
    token counts move around captures a handful of graphs, not one per step."""
    return max(1024, 1 << (num_rows - 1).bit_length())


class GraphedSlots:  # pragma: no cover - needs a CUDA device; benchmarks/gpu_ep.py checks it against the reference
    """:func:`permute_slots_padded` captured once in a CUDA graph for one (device, R, E, capacity): each call is
    three small copies, one replay and one clone instead of the eager launches."""

    def __init__(self, device, num_ranks: int, num_local_experts: int, capacity: int):
        self.capacity = capacity
        self.counts_ext = torch.zeros(num_ranks * num_local_experts + 1, dtype=torch.int64, device=device)
        self.counts_ext[-1] = capacity  # a valid input for warm-up and capture: every row in the extra block
        self.offsets_E = torch.zeros(num_local_experts, dtype=torch.int64, device=device)
        build = lambda: permute_slots_padded(self.counts_ext, num_ranks, num_local_experts,
                                             capacity, self.offsets_E)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: library workspaces are allocated here
            build()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread polls its events while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.slots_ext = build()

    def __call__(self, counts_RE, num_rows: int, expert_offsets_E):
        self.counts_ext[:-1].copy_(counts_RE.reshape(-1))
        self.counts_ext[-1:].fill_(self.capacity - num_rows)
        self.offsets_E.copy_(expert_offsets_E)
        self.graph.replay()
        return self.slots_ext[:num_rows].clone()  # the next replay overwrites slots_ext


if triton is not None:  # pragma: no cover - Triton is no CI dependency; tests run it under TRITON_INTERPRET=1

    @triton.jit
    def _block_starts(counts_ptr, offsets_ptr, block, num_blocks, NUM_LOCAL_EXPERTS: tl.constexpr,
                      CHUNK: tl.constexpr, HAS_OFFSETS: tl.constexpr):
        """Where (rank, expert) block ``block`` (rank-major) starts in the rank-major rows (the sum of the counts
        before it) and in the expert-major slots (its expert's group start plus the counts of the same expert from
        lower ranks). Without ``HAS_OFFSETS`` there is no padding: an expert's group starts after every row of the
        experts before it, summed here over all ``num_blocks`` counts (no offsets tensor to copy to the device)."""
        expert = block % NUM_LOCAL_EXPERTS
        lane = tl.arange(0, CHUNK)
        before = tl.zeros([CHUNK], dtype=tl.int64)
        slot = tl.zeros([CHUNK], dtype=tl.int64)
        limit = num_blocks
        if HAS_OFFSETS:
            limit = block
        for first in range(0, limit, CHUNK):
            idx = first + lane
            n = tl.load(counts_ptr + idx, mask=idx < limit, other=0).to(tl.int64)
            e = idx % NUM_LOCAL_EXPERTS
            before += tl.where(idx < block, n, 0)
            if HAS_OFFSETS:  # the same expert's rows from lower ranks
                slot += tl.where(e == expert, n, 0)
            else:  # and every row of the lower experts
                slot += tl.where((e < expert) | ((e == expert) & (idx < block)), n, 0)
        slot_start = tl.sum(slot, axis=0)
        if HAS_OFFSETS:
            slot_start += tl.load(offsets_ptr + expert).to(tl.int64)
        return tl.sum(before, axis=0), slot_start

    @triton.jit(do_not_specialize=["num_rows"])
    def _permute_slots_kernel(counts_ptr, offsets_ptr, slots_ptr, num_rows, num_blocks,
                              NUM_LOCAL_EXPERTS: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr):
        # One program per (rank, expert) block, rank-major: each of its rows' slot is the block's destination start
        # plus the row's place in the block.
        block = tl.program_id(0)
        src_start, dst_start = _block_starts(counts_ptr, offsets_ptr, block, num_blocks, NUM_LOCAL_EXPERTS, CHUNK,
                                             True)
        count = tl.load(counts_ptr + block).to(tl.int32)
        k = tl.arange(0, ROWS)
        for first in range(0, count, ROWS):
            row = first + k
            # the num_rows bound keeps counts that disagree with num_rows from writing out of bounds
            tl.store(slots_ptr + src_start + row, dst_start + row, mask=(row < count) & (src_start + row < num_rows))

    def permute_slots_triton(counts_RE, num_ranks: int, num_local_experts: int, num_rows: int, expert_offsets_E):
        """The index build in one launch (one program per (rank, expert) block)."""
        counts_RE = counts_RE.reshape(-1).contiguous()
        slots = torch.empty(num_rows, dtype=torch.int64, device=counts_RE.device)
        blocks = num_ranks * num_local_experts
        chunk = min(1024, triton.next_power_of_2(max(blocks, 16)))
        # Triton launches on the current device, which need not be the tensors' one
        with torch.cuda.device(counts_RE.device) if counts_RE.is_cuda else contextlib.nullcontext():
            _permute_slots_kernel[(blocks,)](counts_RE, expert_offsets_E.contiguous(), slots, num_rows, blocks,
                                             NUM_LOCAL_EXPERTS=num_local_experts, CHUNK=chunk, ROWS=256,
                                             num_warps=4)
        return slots


#: How :meth:`TorchKernels.permute_rows` runs: ``"auto"`` (the Triton block copy on CUDA where Triton imports, the
#: gathers through an index elsewhere), ``"triton"`` (forced; under ``TRITON_INTERPRET=1`` on CPU tensors too) or
#: ``"gather"`` (never fused).
PERMUTE_ROWS_IMPLS = ("auto", "triton", "gather")

#: (programs per (rank, expert) block, columns per step, warps) of the block copy. Swept on one H200 (2026-12-01, 24
#: configurations, 32,768 bf16 rows of R=2 ranks, back to back): DeepSeek-like rows (7,168 wide, 256 blocks)
#: 1.09-1.11x the copy floor, Qwen-like (2,048 wide, 128 blocks) 1.09-1.13x, against 1.12-1.15x and 1.15-1.18x for
#: the (16, 1024, 4) used before.
PERMUTE_ROWS_CONFIG = (64, 2048, 4)


if triton is not None:  # pragma: no cover - compiled on CUDA; tests run it under TRITON_INTERPRET=1

    # D stays specialized: its divisibility by 16 lets Triton vectorize the row copies (2x on an H200)
    @triton.jit(do_not_specialize=["num_rows", "num_slots", "num_blocks"])
    def _permute_rows_kernel(x_ptr, y_ptr, counts_ptr, offsets_ptr, num_rows, num_slots, num_blocks, D,
                             NUM_LOCAL_EXPERTS: tl.constexpr, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
                             BLOCK_D: tl.constexpr, TO_EXPERT_MAJOR: tl.constexpr, HAS_OFFSETS: tl.constexpr):
        # Programs (block, j): block is a (rank, expert) block, rank-major; j copies every SPLIT-th of its rows.
        block = tl.program_id(0)
        row_start, slot_start = _block_starts(counts_ptr, offsets_ptr, block, num_blocks, NUM_LOCAL_EXPERTS, CHUNK,
                                              HAS_OFFSETS)
        count = tl.load(counts_ptr + block).to(tl.int32)
        cols = tl.arange(0, BLOCK_D)
        for i in range(tl.program_id(1), count, SPLIT):
            row, slot = row_start + i, slot_start + i
            # counts that disagree with num_rows / num_slots must not read or write out of bounds
            inside = (row < num_rows) & (slot < num_slots)
            if TO_EXPERT_MAJOR:
                src, dst = row, slot
            else:
                src, dst = slot, row
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                m = (c < D) & inside
                tl.store(y_ptr + dst * D + c, tl.load(x_ptr + src * D + c, mask=m), mask=m)

    def permute_rows_triton(x, counts_RE, num_ranks: int, num_local_experts: int, expert_offsets_E, num_rows: int,
                            num_slots: int, to_expert_major: bool):
        """``Kernels.permute_rows`` in one launch: a copy of every (rank, expert) block of rows, its offsets derived
        from the counts in the kernel (no index built, none read; without padding, ``expert_offsets_E`` None, the
        experts' group starts too)."""
        x = x.contiguous()
        D = x[0].numel() if x.shape[0] else 1
        out_rows = num_slots if to_expert_major else num_rows
        # padding slots stay zero; without padding every output row is written
        make = torch.zeros if to_expert_major and num_slots > num_rows else torch.empty
        y = make((out_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        blocks = num_ranks * num_local_experts
        split, block_d, warps = PERMUTE_ROWS_CONFIG
        counts = counts_RE.reshape(-1).contiguous()
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _permute_rows_kernel[(blocks, split)](
                x, y, counts, counts if expert_offsets_E is None else expert_offsets_E.contiguous(), num_rows,
                num_slots, blocks, D, NUM_LOCAL_EXPERTS=num_local_experts,
                CHUNK=min(1024, triton.next_power_of_2(max(blocks, 16))), SPLIT=split,
                BLOCK_D=min(block_d, triton.next_power_of_2(D)), TO_EXPERT_MAJOR=to_expert_major,
                HAS_OFFSETS=expert_offsets_E is not None, num_warps=warps)
        return y


# ---------------------------------------------------------------------- pairs: the top-k gather and weighted sum

#: Implementations ``TorchKernels.pairs_impl`` may name: ``"auto"`` (Triton on CUDA tensors, the neutral reference
#: elsewhere), ``"triton"`` (forced; under ``TRITON_INTERPRET=1`` on CPU tensors too) or ``"reference"``.
PAIRS_IMPLS = ("auto", "triton", "reference")

#: Columns per program of the pair kernels (one program per token or pair and column block; 4 warps).
PAIRS_BLOCK_D = 1024


def pair_inverse(pairs_N, num_tokens: int, top_k: int):
    """int64 ``[T*K]``: for every flat (token, choice) the row of ``pairs_N`` that holds it, ``-1`` where the pair
    was not kept. ``pairs_N`` are unique flat indices ``token * top_k + choice``."""
    inv = torch.full((num_tokens * top_k,), -1, dtype=torch.int64, device=pairs_N.device)
    inv[pairs_N] = torch.arange(pairs_N.shape[0], dtype=torch.int64, device=pairs_N.device)
    return inv


if triton is not None:  # pragma: no cover - compiled on CUDA; tests run it under TRITON_INTERPRET=1

    @triton.jit
    def _sum_pairs_kernel(rows_ptr, scores_ptr, inv_ptr, out_ptr, D, TOP_K: tl.constexpr, HAS_SCORES: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        # Program (token t, column block): out[t] = sum over the kept pairs j = inv[t*K + k] of score[j] * rows[j],
        # accumulated in float32, one rounding to the output's dtype. Reads each kept row once, writes [T, D] once.
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = c < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            j = tl.load(inv_ptr + t * TOP_K + k)
            kept = j >= 0
            row = tl.load(rows_ptr + j * D + c, mask=inside & kept, other=0.0).to(tl.float32)
            if HAS_SCORES:
                row = row * tl.load(scores_ptr + j, mask=kept, other=0.0).to(tl.float32)
            acc += row
        tl.store(out_ptr + t * D + c, acc.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _pairs_backward_kernel(grad_ptr, rows_ptr, scores_ptr, pairs_ptr, grad_rows_ptr, grad_scores_ptr, D,
                               TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, NEED_ROWS: tl.constexpr,
                               NEED_SCORES: tl.constexpr):
        # Program per pair j of token t = pairs[j] // K: grad_rows[j] = score[j] * grad[t] (a gather, no scatter)
        # and grad_scores[j] = <grad[t], rows[j]>, both in float32 before the one rounding.
        j = tl.program_id(0).to(tl.int64)
        t = tl.load(pairs_ptr + j) // TOP_K
        score = tl.load(scores_ptr + j).to(tl.float32)
        cols = tl.arange(0, BLOCK_D)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            inside = c < D
            g = tl.load(grad_ptr + t * D + c, mask=inside, other=0.0).to(tl.float32)
            if NEED_ROWS:
                tl.store(grad_rows_ptr + j * D + c, (g * score).to(grad_rows_ptr.dtype.element_ty), mask=inside)
            if NEED_SCORES:
                dot += g * tl.load(rows_ptr + j * D + c, mask=inside, other=0.0).to(tl.float32)
        if NEED_SCORES:
            tl.store(grad_scores_ptr + j, tl.sum(dot, axis=0).to(grad_scores_ptr.dtype.element_ty))

    def _device_of(x):
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    def sum_pairs_triton(rows_ND, scores_N, inv, num_tokens: int, top_k: int, dtype):
        """``[T, D]`` of ``dtype``: each token's sum over its kept pairs of ``score * row`` (``scores_N`` None:
        weight 1), float32 inside."""
        D = rows_ND.shape[1]
        out = torch.empty((num_tokens, D), dtype=dtype, device=rows_ND.device)
        block = min(PAIRS_BLOCK_D, triton.next_power_of_2(max(D, 1)))
        if num_tokens:
            with _device_of(rows_ND):
                _sum_pairs_kernel[(num_tokens, triton.cdiv(D, block))](
                    rows_ND, rows_ND if scores_N is None else scores_N, inv, out, D, TOP_K=top_k,
                    HAS_SCORES=scores_N is not None, BLOCK_D=block, num_warps=4)
        return out

    class _CombinePairs(torch.autograd.Function):
        """``Kernels.combine_pairs`` in one pass forward and one backward (a gather per pair instead of autograd's
        scatter, the scores' gradient a row dot product in the same pass)."""

        @staticmethod
        def forward(ctx, rows_ND, scores_N, pairs_N, num_tokens: int, top_k: int):
            rows_ND, scores_N, pairs_N = rows_ND.contiguous(), scores_N.contiguous(), pairs_N.contiguous()
            ctx.save_for_backward(rows_ND, scores_N, pairs_N)
            ctx.top_k = top_k
            return sum_pairs_triton(rows_ND, scores_N, pair_inverse(pairs_N, num_tokens, top_k), num_tokens, top_k,
                                    rows_ND.dtype)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_TD):
            rows_ND, scores_N, pairs_N = ctx.saved_tensors
            need_rows, need_scores = ctx.needs_input_grad[:2]
            N, D = rows_ND.shape
            grad_rows = torch.empty_like(rows_ND) if need_rows else None
            grad_scores = torch.empty_like(scores_N) if need_scores else None
            if N and (need_rows or need_scores):
                with _device_of(rows_ND):
                    _pairs_backward_kernel[(N,)](
                        grad_TD.contiguous(), rows_ND, scores_N, pairs_N,
                        rows_ND if grad_rows is None else grad_rows, scores_N if grad_scores is None else grad_scores,
                        D, TOP_K=ctx.top_k, BLOCK_D=min(PAIRS_BLOCK_D, triton.next_power_of_2(max(D, 1))),
                        NEED_ROWS=need_rows, NEED_SCORES=need_scores, num_warps=4)
            return grad_rows, grad_scores, None, None, None

    class _GatherPairs(torch.autograd.Function):
        """``x_TD[pairs_N // top_k]``, its backward each token's sum over its pairs' gradients (the sum kernel,
        weight 1) instead of autograd's accumulating scatter of ``top_k`` rows into each token."""

        @staticmethod
        def forward(ctx, x_TD, pairs_N, top_k: int):
            ctx.save_for_backward(pairs_N)
            ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
            return x_TD[pairs_N // top_k]

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_ND):
            (pairs_N,) = ctx.saved_tensors
            T, K = ctx.num_tokens, ctx.top_k
            grad_ND = grad_ND.contiguous()
            return sum_pairs_triton(grad_ND, None, pair_inverse(pairs_N, T, K), T, K, grad_ND.dtype), None, None

    def combine_pairs_triton(rows_ND, scores_N, pairs_N, num_tokens: int, top_k: int):
        """``Kernels.combine_pairs`` with the Triton kernels (rows ``[N, D]``, N > 0)."""
        return _CombinePairs.apply(rows_ND, scores_N, pairs_N, num_tokens, top_k)

    def gather_pairs_triton(x_TD, pairs_N, top_k: int):
        """``Kernels.gather_pairs`` with the Triton sum as its backward (``x_TD`` 2-D)."""
        return _GatherPairs.apply(x_TD, pairs_N, top_k)


def choose_permute_impl(requested: str, device_type: str, *, triton_usable: bool, capturing: bool,
                        broken: frozenset = frozenset()) -> str:
    """The index build :meth:`TorchPlatform.permute_slots` runs.

    ``"auto"`` keeps the neutral reference off CUDA (on a CPU its ops cost no sync and few launches) and, on CUDA,
    takes the first of Triton, a captured graph and the eager ops that is usable: Triton needs the package, a graph
    cannot be captured while the stream is already capturing, and an implementation that failed once (``broken``)
    is skipped. A forced implementation is returned as it is.

    Raises:
        ValueError: ``requested`` is not one of :data:`PERMUTE_SLOTS_IMPLS`.
    """
    if requested not in PERMUTE_SLOTS_IMPLS:
        raise ValueError(f"permute_slots_impl must be one of {list(PERMUTE_SLOTS_IMPLS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "neutral"
    if triton_usable and "triton" not in broken:
        return "triton"
    if not capturing and "graph" not in broken:
        return "graph"
    return "eager"


# ---------------------------------------------------------------------- SwiGLU

def swiglu_fused(h, g):
    """``silu(h) * g`` with torch's fused ``silu`` (the CUDA path of ``TorchKernels.swiglu``; runs anywhere)."""
    return torch.nn.functional.silu(h) * g


# ---------------------------------------------------------------------- grouped GEMM (grouped_mm)

def _grouped_mm_operand_ok(t) -> bool:
    # CUTLASS reads operands with 16-byte TMA loads: an aligned base, one unit stride in the last two dims and
    # every other stride a multiple of 16 bytes.
    step = 16 // t.element_size()
    inner = t.stride()[-2:]
    if t.data_ptr() % 16 or 1 not in inner or any(s % step for s in t.stride() if s != 1):
        return False
    return min(t.shape[-2:]) > 0


def grouped_mm_layout_ok(x_NK, w_EKM) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands on its fast path (device aside): bf16 both, ``[N, K]``
    times ``[E, K, M]``, 16-byte aligned strides."""
    return (x_NK.dtype == torch.bfloat16 and w_EKM.dtype == torch.bfloat16 and x_NK.dim() == 2
            and w_EKM.dim() == 3 and x_NK.shape[1] == w_EKM.shape[1] and x_NK.shape[0] > 0
            and _grouped_mm_operand_ok(x_NK) and _grouped_mm_operand_ok(w_EKM))


def grouped_mm_device_ok(device) -> bool:
    """Whether ``torch._grouped_mm`` has its fast kernel on ``device``: CUTLASS on sm90 and sm100. Elsewhere (and
    for fp32) torch falls back to a loop that reads the offsets back to the host, worse than the neutral loop, which
    has the counts on the host already."""
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] in (9, 10))
