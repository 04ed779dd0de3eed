"""MindSpore-only cases: graph capture refused, bfloat16 on CPU refused, memory flat over a training loop.

Run on every rank of a MindSpore world (see ``tests/test_mindspore_modes.py``). Each case leaves the world usable for
the next one: every refusal happens on every rank at the same point, before anything is sent.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading

import numpy as np

from hyper_parallel import ExpertParallel, get_platform, init_device_mesh, moe
from hyper_parallel.functional import all_to_all_single_autograd
from hyper_parallel.moe import MoE
from tests.cases import moe_cases
from tests.cases.ep_cases import assert_rel

#: How each capture is requested, as its refusal names it.
CAPTURE_NAMES = {
    "ast": "mindspore.jit (capture_mode='ast', the default)",
    "ast_inner": "mindspore.jit (capture_mode='ast', the default)",
    "graph_mode": "GRAPH_MODE",
    "bytecode": "mindspore.jit(capture_mode='bytecode')",
    "bytecode_inner": "mindspore.jit(capture_mode='bytecode')",
    "trace": "mindspore.jit(capture_mode='trace')",
}


def _splits(rank: int, world: int) -> tuple[list[int], list[int]]:
    """Uneven splits with a zero: rank r sends ``(r + j) % 3`` rows to rank j."""
    send = [(rank + j) % 3 for j in range(world)]
    recv = [(j + rank) % 3 for j in range(world)]
    return send, recv


def _a2a_problem():
    """A differentiable all-to-all with uneven splits: ``loss = sum(all_to_all(x) * w)``, and its exact gradient."""
    import mindspore as ms

    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    send, recv = _splits(rank, world)
    x = ms.Tensor(np.arange(sum(send) * 2, dtype=np.float32).reshape(-1, 2) + 100 * rank)
    weights = [np.random.RandomState(r).randn(sum(_splits(r, world)[1]), 2).astype(np.float32) for r in range(world)]
    w = ms.Tensor(weights[rank])

    def loss(t):
        return (all_to_all_single_autograd(t, output_split_sizes=recv, input_split_sizes=send) * w).sum()

    # d loss / d x: the row this rank sent to rank j is the weight row rank j applied to it
    want = []
    for j in range(world):
        recv_j = _splits(j, world)[1]
        start = sum(recv_j[:rank])
        want.append(weights[j][start:start + send[j]])
    return x, loss, np.concatenate(want) if want else np.zeros((0, 2), np.float32)


def _moe_problem():
    """The MoE layer under ExpertParallel on the world: ``loss = sum(moe(x) * w)`` over its parameters."""
    import mindspore as ms

    p = get_platform()
    layer = MoE(dim=6, hidden_dim=8, num_experts=8, top_k=2, init_std=0.5, seed=0)
    ExpertParallel().apply(layer.experts, init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",)))
    rng = np.random.RandomState(p.get_rank())
    x, w = ms.Tensor(rng.randn(7, 6).astype(np.float32)), ms.Tensor(rng.randn(7, 6).astype(np.float32))
    params = [q for _, q in p.named_parameters(layer) if q.requires_grad]

    def loss(t):  # a def: a graph compiler cannot parse a lambda inside a tuple expression
        return (layer(t) * w).sum()

    return x, loss, params


def _run_captured(capture: str, loss, x, params):
    """``value_and_grad(loss)(x)`` with the capture applied the way a user would apply it."""
    import mindspore as ms

    def vg(f):
        return ms.value_and_grad(f, 0, params or None)

    if capture == "ast":  # the whole step compiled
        return ms.jit(vg(loss))(x)
    if capture == "ast_inner":  # the forward compiled, differentiated from PyNative
        return vg(ms.jit(loss))(x)
    if capture == "bytecode":
        return ms.jit(vg(loss), capture_mode="bytecode")(x)
    if capture == "bytecode_inner":
        return vg(ms.jit(loss, capture_mode="bytecode"))(x)
    if capture == "trace":  # trace records a forward; its gradient is taken from PyNative
        return _in_thread(lambda: vg(ms.jit(loss, capture_mode="trace"))(x))
    if capture == "graph_mode":
        ms.set_context(mode=ms.GRAPH_MODE)
        try:
            return vg(loss)(x)
        finally:
            ms.set_context(mode=ms.PYNATIVE_MODE)
    raise ValueError(f"unknown capture {capture!r}; valid: {sorted(CAPTURE_NAMES)}")


@contextlib.contextmanager
def _compile_dumps_elsewhere():
    """Run the block in a temporary working directory: after a failed graph compilation MindSpore 2.10 writes
    ``rank_N/om/analyze_fail.ir`` under the working directory (neither ``save_graphs_path`` nor
    ``MS_DEV_SAVE_GRAPHS_PATH`` set at run time moves it), which would otherwise land in the checkout."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="hp_ms_graphs_") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _in_thread(fn):
    """``fn()`` on a fresh thread, its exception re-raised here.

    MindSpore 2.10's trace capture reads the source line of every frame on the stack and fails with a TypeError of its
    own on a frame that has none, such as the frozen ``runpy`` frames of a ``python -m`` process (this worker). A new
    thread's stack has none of them."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    if thread.is_alive():
        raise TimeoutError("the traced call did not return within 120 s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def capture_is_refused(capture: str, target: str) -> str:
    """Under ``capture``, ``target`` ("a2a": a differentiable all-to-all; "moe": the MoE layer under
    ExpertParallel) raises a RuntimeError naming the capture before any collective is issued; the same step in
    PyNative mode then still matches the exact gradient (a2a) or the single-device MoE (moe).

    Returns:
        The first line of the refusal, for the test's report.
    """
    p = get_platform()
    x, loss, extra = _a2a_problem() if target == "a2a" else _moe_problem()
    params = [] if target == "a2a" else extra
    with p.count_calls() as calls, _compile_dumps_elsewhere():
        try:
            got = _run_captured(capture, loss, x, params)
        except RuntimeError as e:
            message = str(e)
        else:
            raise AssertionError(f"{target} under {capture} ran instead of raising; it returned {got!r}")
    for part in (CAPTURE_NAMES[capture], "PyNative mode only", "Valid: PyNative mode"):
        assert part in message, f"{target} under {capture}: {part!r} missing from the refusal:\n{message}"
    sent = {k: v for k, v in calls.items() if k != "barrier"}
    assert not sent, f"{target} under {capture}: refused only after issuing {sent}"
    p.barrier()  # every rank refused at the same point: the world is in step
    if target == "a2a":
        import mindspore as ms

        got = ms.grad(loss)(x).asnumpy()
        assert_rel(got, want := extra, f"a2a gradient in PyNative after refusing {capture}", tol=0)
        assert got.shape == want.shape
    else:
        assert moe_cases.moe_matches_single_device("ep", "plain")
    return message.splitlines()[0][:200]


def plain_collectives_refused_under_capture(capture: str) -> bool:
    """A plain (non-differentiable) collective in a compiled or traced function is refused too."""
    import mindspore as ms

    p = get_platform()
    x = ms.Tensor(np.ones((2, 3), np.float32))

    def f(t):
        return p.all_reduce(t) * 2

    jitted = ms.jit(f) if capture == "ast" else ms.jit(f, capture_mode=capture)
    try:
        with _compile_dumps_elsewhere():
            _in_thread(lambda: jitted(x)) if capture == "trace" else jitted(x)
    except RuntimeError as e:
        assert "all_reduce was reached under" in str(e) and CAPTURE_NAMES[capture] in str(e), str(e)
    else:
        raise AssertionError(f"all_reduce under {capture} ran instead of raising")
    world = p.get_world_size()
    np.testing.assert_array_equal(p.all_reduce(x).asnumpy(), np.full((2, 3), world, np.float32))
    return True


def bfloat16_refused_float16_matches() -> float:
    """bfloat16 tokens through ExpertParallel on MindSpore CPU: a TypeError naming backend, device and dtype, before
    the token exchange. The advised float16 runs forward and backward and matches a float32 single-device reference
    at float16 tolerance; plain bfloat16 collectives still work.

    Returns:
        The largest relative error of the float16 run (output, input gradient, weight gradients).
    """
    import mindspore as ms

    p = get_platform()
    rank, world = p.get_rank(), p.get_world_size()
    counts = [[1, 2, 0, 3, 1, 1, 2, 0], [0, 1, 4, 1, 2, 0, 1, 3]]
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))

    def experts(dtype):
        layer = moe.GroupedExperts(dim=6, hidden_dim=8, num_experts=8, init_std=0.5, seed=0)
        if dtype != "float32":
            for name in ("w1", "w2", "w3"):
                p.replace_parameter(layer, name, getattr(layer, name).astype(p.dtype(dtype)))
        return layer

    def rows(r):
        c = counts[r % 2]
        return np.random.RandomState(r).randn(sum(c), 6).astype(np.float32), c

    x_np, c = rows(rank)
    n = p.tensor(c, dtype="int64")

    # bfloat16: refused with the constraint, the received dtype and the valid ones, before anything is exchanged
    layer = experts("bfloat16")
    ExpertParallel().apply(layer, mesh)
    with p.count_calls() as calls:
        try:
            layer(ms.Tensor(x_np).astype(ms.bfloat16), n)
        except TypeError as e:
            message = str(e)
        else:
            raise AssertionError("bfloat16 tokens through ExpertParallel on MindSpore CPU ran instead of raising")
    for part in ("bfloat16", "'mindspore'", "'cpu'", "float32 or float16"):
        assert part in message, f"{part!r} missing from the bfloat16 refusal:\n{message}"
    assert "all_to_all_single" not in calls or calls["all_to_all_single"] == 0, dict(calls)

    # float16 (the advice): forward and backward against the float32 single-device experts over every rank's rows
    ref = experts("float32")
    ref_params = [q for _, q in p.named_parameters(ref)]
    w_out = [np.random.RandomState(50 + r).randn(sum(rows(r)[1]), 6).astype(np.float32) for r in range(world)]
    ref_out, ref_gx, ref_gw = None, None, [0.0, 0.0, 0.0]
    for r in range(world):
        xr, cr = rows(r)
        out = ref(ms.Tensor(xr), p.tensor(cr, dtype="int64"))
        _, (gx,), gw = p.value_and_grad(lambda t, cr=cr, r=r: (ref(t, p.tensor(cr, dtype="int64"))
                                                               * ms.Tensor(w_out[r])).sum(), [ms.Tensor(xr)],
                                        ref_params)
        ref_gw = [a + b.asnumpy() for a, b in zip(ref_gw, gw)]
        if r == rank:
            ref_out, ref_gx = out.asnumpy(), gx.asnumpy()
    half = experts("float16")
    ExpertParallel().apply(half, mesh)
    params = [q for _, q in p.named_parameters(half)]
    x16 = ms.Tensor(x_np).astype(ms.float16)
    out = half(x16, n)
    _, (gx,), gw = p.value_and_grad(lambda t: (half(t, n).astype(ms.float32) * ms.Tensor(w_out[rank])).sum(), [x16],
                                    params)
    errors = []
    for what, got, want in [("output", out, ref_out), ("input grad", gx, ref_gx)] + [
            (f"grad of w{i}", g, want) for i, (g, want) in enumerate(zip(gw, _local_rows(ref_gw, rank, world)), 1)]:
        got = got.astype(ms.float32).asnumpy()
        assert got.dtype == np.float32 and got.shape == want.shape, (what, got.shape, want.shape)
        errors.append(float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
        assert_rel(got, want, f"float16 ExpertParallel {what}, rank {rank}", tol=1e-2)

    # plain bfloat16 collectives are not refused: mccl carries them
    y, _ = p.all_to_all_single(ms.Tensor(np.full((world, 2), rank + 1, np.float32)).astype(ms.bfloat16))
    np.testing.assert_array_equal(np.asarray(p.tolist(y)), np.repeat(np.arange(1, world + 1, dtype=np.float32)[:, None],
                                                                      2, 1))
    return max(errors)


def _local_rows(full_grads, rank, world):
    """This rank's experts' slice (dim 0) of each summed weight gradient: ExpertParallel shards dim 0 evenly."""
    out = []
    for g in full_grads:
        k = g.shape[0] // world
        out.append(g[rank * k:(rank + 1) * k])
    return out


def _rss_mib() -> float:
    """This process's resident set size (Linux ``/proc``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status (the memory check needs Linux)")


def rss_over_training(steps: int, kernels: str) -> tuple[float, float]:
    """Train the MoE layer under ExpertParallel for ``steps`` steps of fresh random tokens (so the routing, and every
    per-expert row count, changes each step) and sample this rank's RSS after step 10 and after the last step.

    Args:
        steps: forward+backward steps (> 10).
        kernels: ``"adapter"`` (the platform's own kernels) or ``"reference"`` (the neutral ``Kernels``, whose
            per-expert slices made MindSpore keep a compiled graph per step).

    Returns:
        ``(rss_mib_at_step_10, rss_mib_at_last_step)``.
    """
    import mindspore as ms

    from hyper_parallel.kernels import Kernels

    p = get_platform()
    layer = MoE(dim=32, hidden_dim=64, num_experts=8, top_k=2, init_std=0.5, seed=0)
    ExpertParallel().apply(layer.experts, init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",)))
    params = [q for _, q in p.named_parameters(layer) if q.requires_grad]
    grad = ms.value_and_grad(lambda t: (layer(t) ** 2).sum(), None, params)
    rng = np.random.RandomState(1000 + p.get_rank())
    own = p.kernels
    if kernels == "reference":
        p.kernels = Kernels(p)
    try:
        for step in range(1, steps + 1):
            loss, _ = grad(ms.Tensor(rng.randn(64, 32).astype(np.float32)))
            assert np.isfinite(loss.asnumpy()), f"step {step}: loss {loss}"
            if step == 10:
                at_10 = _rss_mib()
    finally:
        p.kernels = own
    p.barrier()
    return at_10, _rss_mib()


def grouped_mm_matches_reference() -> bool:
    """The adapter's ``grouped_mm`` (one split) equals the neutral reference (a slice per expert), output and both
    gradients, for uneven counts, empty experts, one live expert, a skewed routing and no rows."""
    import mindspore as ms

    from hyper_parallel.kernels import Kernels

    p = get_platform()
    reference = Kernels(p)
    assert type(p.kernels) is not Kernels, "the MindSpore adapter should install its own kernels"
    rng = np.random.RandomState(7)
    w = ms.Tensor(rng.randn(4, 5, 3).astype(np.float32))
    for counts in ([2, 0, 3, 1], [0, 0, 4, 0], [1, 1, 1, 1], [0, 0, 0, 0], [6, 0, 0, 0], [5, 9, 0, 7], [9, 1, 0, 0]):
        x = ms.Tensor(rng.randn(sum(counts), 5).astype(np.float32)) if sum(counts) else p.zeros((0, 5))
        g = ms.Tensor(rng.randn(sum(counts), 3).astype(np.float32)) if sum(counts) else p.zeros((0, 3))
        results = []
        for kernels in (p.kernels, reference):
            out = kernels.grouped_mm(x, w, counts)
            if not sum(counts):
                results.append((out.asnumpy(),))
                continue
            _, grads = ms.value_and_grad(lambda a, b, k=kernels: (k.grouped_mm(a, b, counts) * g).sum(), (0, 1))(x, w)
            results.append((out.asnumpy(), *(t.asnumpy() for t in grads)))
        for got, want in zip(*results):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"grouped_mm counts {counts}")
    for bad in ([2, 0, 3], [2, 0, 3, 2], [-1, 2, 3, 2]):  # wrong length, wrong sum, negative: the reference's error
        try:
            p.kernels.grouped_mm(ms.Tensor(np.ones((6, 5), np.float32)), w, bad)
        except ValueError as e:
            assert "num_tokens_per_expert" in str(e), str(e)
        else:
            raise AssertionError(f"grouped_mm accepted counts {bad} for 6 rows and 4 experts")
    return True



def training_after_a_raising_step_is_right(parallel: bool) -> bool:
    """A ``value_and_grad`` whose function raises (a refused input, a user's own error) leaves later training
    right: MindSpore 2.10 keeps its half-built autograd state, and the next steps with its own optimizer
    (``nn.AdamWeightDecay``) silently took other values (measured: the loss from the second step on), unless the
    adapter resets it. Three steps from the same start give the same losses and weights before and after."""
    import mindspore as ms

    p = get_platform()
    mesh = init_device_mesh("cpu", (p.get_world_size(),), mesh_dim_names=("ep",)) if parallel else None
    x = p.tensor(np.random.RandomState(p.get_rank() if parallel else 0).randn(12, 8).astype(np.float32))

    def build():
        layer = MoE(dim=8, hidden_dim=16, num_experts=4, top_k=2, num_shared_experts=1, init_std=0.5, seed=3)
        if parallel:
            ExpertParallel().apply(layer.experts, mesh)
        return layer, [q for _, q in p.named_parameters(layer) if q.requires_grad]

    def train() -> tuple[list, list]:
        layer, params = build()
        opt = ms.nn.AdamWeightDecay(params, learning_rate=0.05)
        losses = []
        for _ in range(3):
            loss, _, grads = p.value_and_grad(lambda: (layer(x) ** 2).mean(), [], params)
            opt(tuple(grads))
            losses.append(float(loss.asnumpy()))
        return losses, [q.asnumpy() for q in params]

    def raising():
        layer, _ = build()
        (layer(x) ** 2).sum()
        raise ValueError("a user's error, mid-forward")

    before = train()
    try:
        p.value_and_grad(raising, [], build()[1])
    except ValueError as e:
        assert "mid-forward" in str(e), str(e)
    else:
        raise AssertionError("the raising function did not raise")
    after = train()
    assert after[0] == before[0], f"losses {after[0]} after the raising step, {before[0]} before"
    for got, want in zip(after[1], before[1]):
        np.testing.assert_array_equal(got, want)
    return True


def router_under_jit_matches_eager(capture: str) -> bool:
    """The router compiled in place (what docs/failure_modes.md says runs under ``mindspore.jit``) routes like the
    eager router on three different batches: its expert counts and casts are NumPy bookkeeping on CPU, which a
    compiler must not bake in as the first batch's constants."""
    import mindspore as ms

    p = get_platform()
    layer = MoE(dim=16, hidden_dim=32, num_experts=8, top_k=2, init_std=0.5, seed=0)
    batches = [p.tensor(np.random.RandomState(s).randn(20, 16).astype(np.float32)) for s in (1, 2, 3)]
    eager = [[t.asnumpy() for t in layer.router(x)] for x in batches]
    compiled = ms.jit(layer.router.construct) if capture == "ast" else \
        ms.jit(layer.router.construct, capture_mode=capture)
    with _compile_dumps_elsewhere():
        got = [[t.asnumpy() for t in compiled(x)] for x in batches]
    assert len({tuple(e[2].tolist()) for e in eager}) == 3, "the batches should route differently"
    for batch, (g, e) in enumerate(zip(got, eager)):
        for name, a, b in zip(("scores", "experts", "counts"), g, e):
            np.testing.assert_array_equal(a, b, err_msg=f"{capture}: {name} of batch {batch}")
    return True
