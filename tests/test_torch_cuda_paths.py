"""The torch adapter's CUDA fast paths, checked on the CPU wherever their logic allows.

The GPU itself is exercised by ``benchmarks/gpu_ep.py`` (correctness against the references, then timings). Here:
the index-build variants against the neutral reference, the choice between them and its fallbacks, the Triton
kernel under Triton's interpreter (Triton is a test dependency where it has wheels), the host-copy decision, and
``torch._grouped_mm`` (which has a CPU kernel) against the neutral per-expert loop.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from hyper_parallel.kernels import Kernels  # noqa: E402
from platform_adapters import torch as adapter  # noqa: E402
from tests.cases import permute_cases as pc  # noqa: E402


def neutral_slots(counts, R, E, align=1):
    """The neutral reference (``Kernels.permute_slots``) and its inputs."""
    tokens = [sum(counts[e::E]) for e in range(E)]
    per_expert = [t if align == 1 else max(align, -(-t // align) * align) for t in tokens]
    offsets = [sum(per_expert[:e]) for e in range(E)]
    counts_t, offsets_t = torch.tensor(counts), torch.tensor(offsets)
    ref = Kernels(adapter.TorchPlatform()).permute_slots(counts_t, R, E, sum(counts), offsets_t)
    return ref, counts_t, offsets_t


def slots_to_source_rows(slots, num_slots, T):
    src = [T] * num_slots
    for row, slot in enumerate(slots):
        src[slot] = row
    return src


CASES = st.integers(1, 4).flatmap(lambda R: st.integers(1, 5).flatmap(lambda E: st.tuples(
    st.just(R), st.just(E), st.lists(st.integers(0, 40), min_size=R * E, max_size=R * E)))).filter(
        lambda c: sum(c[2]) > 0)


@settings(max_examples=80, deadline=None)
@given(CASES, st.sampled_from([1, 8, 32]))
def test_eager_and_padded_index_builds_match_the_neutral_reference(case, align):
    R, E, counts = case
    ref, counts_t, offsets_t = neutral_slots(counts, R, E, align)
    T = sum(counts)
    assert torch.equal(adapter.permute_slots_eager(counts_t, R, E, T, offsets_t), ref)
    for capacity in (T, adapter.graph_capacity(T)):  # no extra rows, and the captured graph's padding
        ext = torch.tensor(counts + [capacity - T])
        assert torch.equal(adapter.permute_slots_padded(ext, R, E, capacity, offsets_t)[:T], ref)
    # and the reference itself against the brute-force permutation (source row of every slot)
    if align == 1:
        assert slots_to_source_rows(ref.tolist(), T, T) == pc.reference(counts, R, E, 1)


def test_worked_example():
    # rank-major rows [r0e0: 0][r0e1: 1 2][r1e0: 3 4 5] -> slots: e0 = rows 0 3 4 5, e1 = rows 1 2
    ref, counts_t, offsets_t = neutral_slots([1, 2, 3, 0], 2, 2)
    assert ref.tolist() == [0, 4, 5, 1, 2, 3]
    assert adapter.permute_slots_eager(counts_t, 2, 2, 6, offsets_t).tolist() == [0, 4, 5, 1, 2, 3]


@pytest.mark.parametrize("rows,capacity", [(1, 1024), (1024, 1024), (1025, 2048), (32768, 32768), (40000, 65536)])
def test_graph_capacity_is_a_power_of_two_bucket(rows, capacity):
    assert adapter.graph_capacity(rows) == capacity


@pytest.mark.parametrize("requested,device,triton_usable,capturing,broken,want", [
    ("auto", "cpu", True, False, (), "neutral"),
    ("auto", "cuda", True, False, (), "triton"),
    ("auto", "cuda", False, False, (), "graph"),
    ("auto", "cuda", False, True, (), "eager"),       # no graph inside someone else's capture
    ("auto", "cuda", True, True, (), "triton"),       # a Triton launch can be captured
    ("auto", "cuda", True, False, ("triton",), "graph"),
    ("auto", "cuda", True, False, ("triton", "graph"), "eager"),
    ("graph", "cpu", True, False, (), "graph"),       # forced: returned as it is
    ("neutral", "cuda", True, False, (), "neutral"),
])
def test_choice_of_index_build(requested, device, triton_usable, capturing, broken, want):
    assert adapter.choose_permute_impl(requested, device, triton_usable=triton_usable, capturing=capturing,
                                       broken=frozenset(broken)) == want


def test_unknown_index_build_is_rejected():
    p = adapter.TorchPlatform().kernels
    p.permute_slots_impl = "fused"
    with pytest.raises(ValueError, match=r"permute_slots_impl must be one of \['auto', 'triton', 'graph', 'eager', "
                                         r"'neutral'\], got 'fused'"):
        p.permute_slots(torch.tensor([1]), 1, 1, 1, torch.tensor([0]))


@pytest.mark.parametrize("impl", ["auto", "eager", "neutral"])
def test_platform_permute_slots_on_cpu(impl):
    ref, counts_t, offsets_t = neutral_slots([3, 0, 2, 5, 1, 0], 2, 3, align=8)
    p = adapter.TorchPlatform().kernels
    p.permute_slots_impl = impl
    assert torch.equal(p.permute_slots(counts_t.reshape(2, 3), 2, 3, 11, offsets_t), ref)


def test_auto_falls_back_once_per_failing_build_and_warns(monkeypatch):
    # Pretend to be on CUDA with Triton present: the Triton and graph builds both fail here, the eager one runs.
    real_choose = adapter.choose_permute_impl
    monkeypatch.setattr(adapter, "choose_permute_impl",
                        lambda req, dev, **kw: real_choose(req, "cuda", **dict(kw, triton_usable=True)))
    monkeypatch.setattr(adapter, "triton", object())

    def broken_kernel(*args):
        raise RuntimeError("no GPU")

    monkeypatch.setattr(adapter, "permute_slots_triton", broken_kernel, raising=False)
    p = adapter.TorchPlatform().kernels
    ref, counts_t, offsets_t = neutral_slots([2, 0, 1, 4], 2, 2)
    with pytest.warns(RuntimeWarning) as seen:
        assert torch.equal(p.permute_slots(counts_t, 2, 2, 7, offsets_t), ref)
    messages = [str(w.message) for w in seen]
    assert len(messages) == 2 and "the triton index build failed (RuntimeError: no GPU)" in messages[0], messages
    assert "the graph index build failed" in messages[1]
    assert p._broken_impls == {"triton", "graph"}
    assert torch.equal(p.permute_slots(counts_t, 2, 2, 7, offsets_t), ref)  # straight to eager, no new warning


def test_forced_build_that_cannot_run_raises(monkeypatch):
    p = adapter.TorchPlatform().kernels
    p.permute_slots_impl = "triton"
    monkeypatch.setattr(adapter, "triton", None)
    with pytest.raises(RuntimeError, match=r"permute_slots_impl='triton' needs the triton package"):
        p.permute_slots(torch.tensor([1]), 1, 1, 1, torch.tensor([0]))


# Triton publishes wheels for Linux on x86_64 and aarch64, CPython 3.10 to 3.14. Where it has one, the test extra
# installs it (pyproject.toml), so a missing Triton is a broken environment: the kernel would go untested.
TRITON_HAS_WHEELS = (sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
                     and (3, 10) <= sys.version_info[:2] < (3, 15))

INTERPRETED_CASES = [  # (counts_RE rank-major, R, E)
    ([1, 2, 3, 0], 2, 2),                           # the worked example
    ([0, 0, 5], 1, 3),                              # one rank; experts that get no rows
    ([7], 1, 1),                                    # a single block
    ([0, 0, 0, 0], 2, 2),                           # no rows at all: an empty result, nothing written
    ([0, 0, 4, 0, 0, 0, 9, 1], 4, 2),               # several ranks, two of them sending nothing
    ([300, 0, 17, 513], 2, 2),                      # blocks longer than the kernel's 256-row loop
    ([(7 * i) % 5 for i in range(1040)], 2, 520),   # more blocks than one 1024-lane chunk: the prefix loops twice
]
"""The fixed inputs of the interpreted kernel; the subprocess adds seeded random ones."""


def run_interpreted(script: str, **env) -> str:
    """``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton reads it when ``@triton.jit`` defines a
    kernel, which happens when the adapter is imported, long before a test runs; setting it for the whole session
    would also turn every real GPU kernel of a CUDA run into an interpreted one); its stdout. Skips where Triton has
    no wheel; fails where it should be installed and is not."""
    if importlib.util.find_spec("triton") is None:
        if TRITON_HAS_WHEELS:
            pytest.fail("triton is not installed, but it is a test dependency on this platform "
                        "(pip install -e '.[test]'): the Triton kernels would go untested")
        pytest.skip(f"Triton publishes no wheel for {sys.platform} {platform.machine()} "
                    f"Python {sys.version_info[0]}.{sys.version_info[1]}")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, TRITON_INTERPRET="1", **env),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_triton_kernel_under_the_interpreter():
    """The fused Triton index build on CPU tensors under ``TRITON_INTERPRET=1`` (:func:`run_interpreted`), against
    the neutral reference: called directly without padding (align 1), and through the adapter's forced ``"triton"``
    build with padding (align 16)."""
    stdout = run_interpreted("""
        import os, random, torch
        assert os.environ["TRITON_INTERPRET"] == "1"
        from platform_adapters import torch as adapter
        from tests.test_torch_cuda_paths import INTERPRETED_CASES, neutral_slots
        rng = random.Random(0)
        cases = list(INTERPRETED_CASES)
        for _ in range(20):
            R, E = rng.randint(1, 4), rng.randint(1, 40)
            cases.append(([rng.choice([0, 0, 1, 3, 17, 300]) for _ in range(R * E)], R, E))
        kernels = adapter.TorchPlatform().kernels
        kernels.permute_slots_impl = "triton"  # forced: no fallback can hide a failing kernel
        checked = 0
        for counts, R, E in cases:
            # the kernel itself without padding, and through the platform with padding (each interpreted launch
            # costs up to seconds: the kernel is the same, only the offsets differ)
            for align, build in ((1, adapter.permute_slots_triton), (16, kernels.permute_slots)):
                ref, counts_t, offsets_t = neutral_slots(counts, R, E, align)
                got = build(counts_t.reshape(R, E), R, E, sum(counts), offsets_t)
                assert got.dtype == torch.int64 and torch.equal(got, ref), (counts, R, E, align, got, ref)
                checked += 1
        print(f"interpreted kernel matches the reference in {checked} cases")
    """)
    assert f"interpreted kernel matches the reference in {2 * (len(INTERPRETED_CASES) + 20)} cases" in stdout, stdout


@pytest.mark.parametrize("device,nbytes,mode", [("cuda", 8 * 256, "pinned"), ("cuda", 1 << 20, "pinned"),
                                                 ("cuda", (1 << 20) + 1, "plain"), ("cpu", 8, "plain"),
                                                 ("npu", 8, "plain")])
def test_host_copy_mode(device, nbytes, mode):
    assert adapter.host_copy_mode(device, nbytes) == mode


@pytest.mark.parametrize("data,dtype", [([1, 2, 3], "int64"), ((4, 5), "int32"), ([1.5, 2], "float32"),
                                        ([0.1, 2], "float64"), ([[1, 2], [3, 4]], "float32"), ([1.5, 2.7], "int64"),
                                        ([True, False], "int64"), ([], "int64"), ([1, 2], "bfloat16")],
                         ids=["int64", "int32-tuple", "float32", "float64", "nested", "floats-to-int", "bools",
                              "empty", "no-array-code"])
def test_host_tensor_equals_torch_tensor(data, dtype):
    want = torch.tensor(data, dtype=getattr(torch, dtype))
    got = adapter.host_tensor(data, getattr(torch, dtype))
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_host_tensor_overflow_is_torchs_error():
    with pytest.raises(RuntimeError, match="overflow"):
        adapter.host_tensor([2 ** 40], torch.int32)


def test_tensor_on_cpu_keeps_dtype_and_device():
    p = adapter.TorchPlatform()
    t = p.tensor([1, 2, 3], dtype="int64")
    assert t.dtype == torch.int64 and t.device.type == "cpu" and t.tolist() == [1, 2, 3]
    assert p.tensor([[1.5]], dtype="float32", device="cpu").shape == (1, 1)


# ---------------------------------------------------------------------- grouped_mm

def _operands(N, K, M, E, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=g).to(dtype)
    w = torch.randn(E, M, K, generator=g).to(dtype).mT  # [E, K, M] as the experts pass it: w.mT of [E, M, K]
    return x, w


def test_grouped_mm_layout_rules():
    x, w = _operands(10, 16, 24, 3, torch.bfloat16)
    assert adapter.grouped_mm_layout_ok(x, w)
    assert adapter.grouped_mm_layout_ok(x, w.contiguous())                  # row-major weights too
    assert not adapter.grouped_mm_layout_ok(x.float(), w.float())            # fp32: torch's slow fallback
    assert not adapter.grouped_mm_layout_ok(x[:0], w)                        # no rows
    assert not adapter.grouped_mm_layout_ok(x[:, :12].contiguous(), w[:, :12])  # K=12: rows of 24 bytes
    assert not adapter.grouped_mm_layout_ok(x[:, 1:9], w[:, :8])             # base off by 2 bytes
    assert not adapter.grouped_mm_layout_ok(x, w[:, :8])                     # K mismatch
    assert not adapter.grouped_mm_device_ok(torch.device("cpu"))


@pytest.mark.parametrize("counts", [[3, 0, 7], [0, 0, 10], [10, 0, 0], [4, 4, 2]])
def test_grouped_mm_kernel_matches_the_loop_forward_and_backward(counts):
    # torch._grouped_mm has a CPU kernel: the call the CUDA path makes, checked against the per-expert loop
    p = adapter.TorchPlatform().kernels
    x, w = _operands(sum(counts), 16, 24, 3, torch.float32)
    results = []
    for fn in (lambda a, b: p._grouped_mm_fast(a, b, counts),
               lambda a, b: Kernels.grouped_mm(p, a, b, counts)):
        a, b = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = fn(a, b)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        results.append((y.detach(), a.grad, b.grad))
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(results[0][2][[e for e, n in enumerate(counts) if n == 0]]) == 0  # empty experts


def test_grouped_mm_group_ends_are_copied_once_per_counts():
    p = adapter.TorchPlatform().kernels
    x, w = _operands(6, 16, 8, 2, torch.float32)
    p._grouped_mm_fast(x, w, [2, 4])
    ends = p._group_ends_cache[1]
    assert ends.dtype == torch.int32 and ends.tolist() == [2, 6]
    p._grouped_mm_fast(x, w, [2, 4])
    assert p._group_ends_cache[1] is ends
    p._grouped_mm_fast(x, w, [5, 1])
    assert p._group_ends_cache[1].tolist() == [5, 6]


def test_grouped_mm_off_cuda_is_the_reference():
    p = adapter.TorchPlatform().kernels
    x, w = _operands(5, 16, 8, 2, torch.bfloat16)
    torch.testing.assert_close(p.grouped_mm(x, w, (2, 3)), Kernels.grouped_mm(p, x, w, [2, 3]))
    with pytest.raises(ValueError, match=r"grouped_mm: num_tokens_per_expert must be 2 non-negative counts summing "
                                         r"to the 5 rows, got \[2, 2\]"):
        p.grouped_mm(x, w, [2, 2])


def test_grouped_mm_takes_the_kernel_when_the_device_allows(monkeypatch):
    monkeypatch.setattr(adapter, "grouped_mm_device_ok", lambda device: True)
    p = adapter.TorchPlatform().kernels
    x, w = _operands(5, 16, 8, 2, torch.bfloat16)
    calls = []
    real = p._grouped_mm_fast
    monkeypatch.setattr(p, "_grouped_mm_fast", lambda *a: calls.append(a) or real(*a))
    p.grouped_mm(x, w, (2, 3))
    p.grouped_mm(x.float(), w.float(), (2, 3))  # fp32: the loop
    with pytest.raises(ValueError, match="non-negative counts"):
        p.grouped_mm(x, w, [1, 1])  # bad counts still reach the reference's check
    assert len(calls) == 1


# ---------------------------------------------------------------------- benchmarks/gpu_ep.py: CPU-checkable logic
@pytest.fixture(scope="module")
def gpu_ep():
    """The benchmark script as a module, imported without leaving its environment default or path entries."""
    import importlib.util

    saved_env, saved_path = os.environ.get("HYPER_PARALLEL_PLATFORM"), list(sys.path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gpu_ep_under_test", os.path.join(root, "benchmarks", "gpu_ep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("HYPER_PARALLEL_PLATFORM", None)
        else:
            os.environ["HYPER_PARALLEL_PLATFORM"] = saved_env
    return module


def test_all_to_all_bytes_count_every_row_and_the_off_rank_rows(gpu_ep):
    # rank 1 of 2 sends 3 rows to rank 0 and 5 to itself, receives 4 from rank 0 and 2 from itself; D=7, bf16
    got = gpu_ep.a2a_bytes_of([3, 5], [4, 2], 1, 7)
    assert got == {"all": (8 + 6) * 7 * 2, "off_rank": (3 + 4) * 7 * 2}
    assert gpu_ep.common.gb_per_s(2e9, 1e6) == 2.0  # 2 GB in one second (gpu_common, as gpu_ep loaded it)


def test_etp_shards_sum_to_the_full_hidden_experts(gpu_ep):
    g = torch.Generator().manual_seed(0)
    E, H, D, tp = 3, 8, 5, 2
    full = [torch.randn(E, H, D, generator=g, dtype=torch.float64), torch.randn(E, D, H, generator=g,
                                                                                 dtype=torch.float64),
            torch.randn(E, H, D, generator=g, dtype=torch.float64)]
    x = torch.randn(4, D, generator=g, dtype=torch.float64)

    def swiglu(w1, w2, w3):
        return torch.stack([(torch.nn.functional.silu(x @ a.T) * (x @ c.T)) @ b.T for a, b, c in zip(w1, w2, w3)])

    shards = [gpu_ep.etp_shards(full, r, tp) for r in range(tp)]
    assert all(s.is_contiguous() and s.requires_grad and s.is_leaf for ss in shards for s in ss)
    assert [list(s.shape) for s in shards[0]] == [[E, H // tp, D], [E, D, H // tp], [E, H // tp, D]]
    torch.testing.assert_close(sum(swiglu(*[s.detach() for s in ss]) for ss in shards), swiglu(*full))
    # the gradient slices the checks compare against are the same cut
    for r in range(tp):
        for s, v in zip(shards[r], gpu_ep.tp_slices(full, r, tp)):
            assert torch.equal(s.detach(), v)


def test_checks_are_reduced_to_their_worst_over_ranks(gpu_ep, monkeypatch):
    monkeypatch.setattr(gpu_ep.common, "DEV", torch.device("cpu"))  # the one device, in gpu_common

    class TwoRanks:  # the other rank: err 3e-3, ok False, bad True
        def all_reduce(self, t, op):
            assert op == "max"
            return torch.maximum(t, torch.tensor([3e-3, 1.0, 0.0], dtype=t.dtype))

    checks = {"err": 1.5e-3, "ok": True, "bad": False, "impl": "triton", "syncs": [1, 1]}
    gpu_ep.worst_over_ranks(TwoRanks(), checks)
    assert checks == {"err": 3e-3, "ok": False, "bad": False, "impl": "triton", "syncs": [1, 1]}


# ---------------------------------------------------------------------- permute_rows (the fused permute step)
def test_permute_rows_impl_choice():
    kernels = adapter.TorchPlatform().kernels
    counts = torch.tensor([1, 2])
    assert kernels.use_fused_permute(counts) is False  # "auto" on a CPU tensor: the gathers through an index
    kernels.permute_rows_impl = "triton"
    assert kernels.use_fused_permute(counts) is True
    kernels.permute_rows_impl = "gather"
    assert kernels.use_fused_permute(counts) is False
    kernels.permute_rows_impl = "fused"
    with pytest.raises(ValueError, match=r"permute_rows_impl must be one of \['auto', 'triton', 'gather'\], got "
                                         r"'fused'"):
        kernels.use_fused_permute(counts)
    # the group starts may be left to the kernel only without padding slots
    reference = Kernels(adapter.TorchPlatform())
    with pytest.raises(ValueError, match=r"expert_offsets_E may be None only without padding slots, got 8 slots "
                                         r"for 3 rows"):
        reference.permute_rows(torch.zeros(3, 2), counts, 1, 2, None, 3, 8, True)


def test_permute_rows_kernel_under_the_interpreter():
    """The Triton block copy (``permute_rows_triton``) on CPU tensors under ``TRITON_INTERPRET=1``: both directions
    against the neutral ``Kernels.permute_rows`` (bit for bit, padding slots zero), then forced through the
    platform (``permute_rows_impl="triton"``) in dispatch's permute / unpermute with values and gradients against
    the brute-force reference (:func:`run_interpreted`)."""
    stdout = run_interpreted("""
        import os, random, torch
        assert os.environ["TRITON_INTERPRET"] == "1"
        from hyper_parallel import get_platform
        from hyper_parallel.kernels import Kernels
        from platform_adapters import torch as adapter
        from tests.cases import permute_cases as pc
        from tests.test_torch_cuda_paths import neutral_slots
        reference = Kernels(adapter.TorchPlatform())
        rng = random.Random(1)
        from platform_adapters import _torch_cuda
        checked, config = 0, _torch_cuda.PERMUTE_ROWS_CONFIG
        for case in range(16):
            R, E = rng.randint(1, 4), rng.randint(1, 6)
            counts = [rng.choice([0, 0, 1, 3, 17]) for _ in range(R * E)]
            if not sum(counts):
                continue
            align = rng.choice([1, 8])
            _, counts_t, offsets_t = neutral_slots(counts, R, E, align)
            T = sum(counts)
            P = T if align == 1 else sum(max(align, -(-sum(counts[e::E]) // align) * align) for e in range(E))
            D = rng.choice([1, 5, 33])
            # 16-column steps (several per row, the last one partial) or whole rows; 3 or 4 programs per block (the
            # interpreter runs programs one by one: the package's 64 are left to the platform cases below)
            _torch_cuda.PERMUTE_ROWS_CONFIG = (3, 64, 1) if case % 2 else (4, 16, 1)
            for to_expert_major, rows in ((True, T), (False, P)):
                x = torch.randn(rows, D)
                args = (counts_t, R, E, offsets_t, T, P, to_expert_major)
                got, want = adapter.permute_rows_triton(x, *args), reference.permute_rows(x, *args)
                assert got.dtype == x.dtype and torch.equal(got, want), (counts, R, E, align, to_expert_major, D)
                if P == T:  # no padding: the group starts derived from the counts, in the kernel and the reference
                    bare = (counts_t, R, E, None, T, P, to_expert_major)
                    assert torch.equal(adapter.permute_rows_triton(x, *bare), want), (counts, R, E)
                    assert torch.equal(reference.permute_rows(x, *bare), want), (counts, R, E)
                checked += 1
        _torch_cuda.PERMUTE_ROWS_CONFIG = config
        kernels = get_platform().kernels
        kernels.permute_rows_impl = "triton"  # forced: every permute and unpermute below runs the kernel
        for counts, R, E, align in (([1, 2, 3, 0], 2, 2, 1), ([1, 2, 3, 0], 2, 2, 8), ([0, 5, 0, 2, 4, 1], 3, 2, 1)):
            pc._check(counts, R, E, align, 3)
            checked += 1
        print(f"interpreted block copy matches the references in {checked} cases")
    """, HYPER_PARALLEL_PLATFORM="torch")
    m = re.search(r"interpreted block copy matches the references in (\d+) cases", stdout)
    assert m and int(m.group(1)) >= 15, stdout


def test_the_torchtitan_comparison_runs_both_pipelines_to_the_same_numbers(tmp_path):
    """benchmarks/gpu_side_by_side.py at its smoke size on 2 CPU ranks: both pipelines (ours and torchtitan
    0.3.0's dispatcher; Megatron-Core does not import on this Python) match the fp32 reference, outputs and every
    gradient, and each step is timed both ways."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HYPER_PARALLEL_PLATFORM": "torch", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "hyper_parallel.launch", "--nproc", "2", "--timeout", "240",
                          "benchmarks/gpu_side_by_side.py", "--shapes", "tiny", "--iters", "2", "--warmup", "1",
                          "--layer-iters", "1", "--rounds", "1", "--out", str(tmp_path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "gpu_side_by_side_tiny.json").read_text())
    checks = result["checks"]
    for label in ("ours", "torchtitan"):
        for what in ("out", "dx", "dw1", "dw2", "dw3"):
            assert 0 < checks[f"{label}_bf16_vs_fp32_{what}_rel_err"] < 0.01, checks  # bf16 rounding, not a bug
    assert checks["token_path_ours_vs_torchtitan_rel_err"] < 0.01
    assert result["pipelines"] == ["ours", "torchtitan"] and "megatron_left_out" in result
    assert sorted(result["times"]) == ["layer_fwd_bwd_ours", "layer_fwd_bwd_torchtitan", "token_path_fwd_ours",
                                       "token_path_fwd_torchtitan"]
    assert all(len(v) == 1 and v[0] > 0 for v in result["times"].values())


# ---------------------------------------------------------------------- gather_pairs / combine_pairs (the pair kernels)
def test_pairs_impl_choice():
    kernels = adapter.TorchPlatform().kernels
    x = torch.ones(3, 2)
    assert kernels._triton_for("pairs", kernels.pairs_impl, x) is False  # "auto" on a CPU tensor: the reference
    kernels.pairs_impl = "scatter"
    with pytest.raises(ValueError, match=r"pairs_impl must be one of \['auto', 'triton', 'reference'\], got "
                                         r"'scatter'"):
        kernels.combine_pairs(x, torch.ones(3), torch.arange(3), 3, 1)


def test_pair_kernels_under_the_interpreter():
    """The Triton pair kernels (``gather_pairs``' backward and ``combine_pairs`` forward and backward) on CPU tensors
    under ``TRITON_INTERPRET=1`` against the neutral references, values and every gradient, float32 and bf16: tokens
    with no kept pair, one choice (K=1), rows wider than one column block; then forced through the platform
    (``pairs_impl="triton"``) in a whole MoE layer against the same layer on the references. Under
    :func:`run_interpreted`."""
    stdout = run_interpreted("""
        import os, torch
        assert os.environ["TRITON_INTERPRET"] == "1"
        from hyper_parallel import get_platform
        from hyper_parallel.kernels import Kernels
        from hyper_parallel.moe import MoE
        from platform_adapters import torch as adapter
        reference = Kernels(adapter.TorchPlatform())
        torch.manual_seed(0)

        def run(fn, x, scores, pairs, T, K):
            x, scores = x.clone().requires_grad_(), scores.clone().requires_grad_()
            rows = fn.gather_pairs(x, pairs, K) * 1.5  # a non-trivial gradient into the gather
            out = fn.combine_pairs(rows, scores, pairs, T, K)
            (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            return rows, out, x.grad, scores.grad

        checked = 0
        for T, K, D, keep in ((7, 2, 5, 0.7), (9, 1, 33, 0.5), (6, 4, 1100, 0.8), (4, 3, 16, 1.0)):
            for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -5)):
                pairs = torch.nonzero(torch.rand(T * K) < keep).reshape(-1)
                pairs = pairs[torch.randperm(len(pairs))]  # any order: the reorderer's is by expert
                x = torch.randn(T, D).to(dtype)
                scores = torch.rand(len(pairs))
                fast = adapter.TorchPlatform().kernels
                fast.pairs_impl = "triton"  # forced: no fallback can hide a failing kernel
                got, want = run(fast, x, scores, pairs, T, K), run(reference, x, scores, pairs, T, K)
                exact = run(reference, x.double(), scores.double(), pairs, T, K)
                for name, g, w, e in zip(("rows", "out", "x.grad", "scores.grad"), got, want, exact):
                    assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
                    err = (g.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                    # float32 catches any wrong index or weight; bf16 checks the casts (x.grad is rounded to bf16
                    # three times on its way, and the interpreter rounds toward zero where a GPU rounds to nearest)
                    assert err <= tol, (T, K, D, dtype, name, err)
                checked += 1
        kernels = get_platform().kernels
        results = []
        for impl in ("reference", "triton"):
            kernels.pairs_impl = impl
            moe = MoE(dim=16, hidden_dim=24, num_experts=6, top_k=2, num_shared_experts=1, capacity_factor=1.0,
                      init_std=0.3, seed=0)
            x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
            moe(x).square().sum().backward()
            results.append([moe(x).detach(), x.grad] + [q.grad for q in moe.parameters() if q.grad is not None])
        assert len(results[1]) >= 5
        for g, w in zip(*results):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), (g - w).abs().max()
        print(f"interpreted pair kernels match the references in {checked + 1} cases")
    """, HYPER_PARALLEL_PLATFORM="torch")
    assert "interpreted pair kernels match the references in 9 cases" in stdout, stdout
