"""The third-party MoE models of tests/third_party.py build, run forward and backward, and are deterministic.

Real transformers 5.x and torchtitan 0.3.0 code (installed by ci/setup.sh from ci/third_party.txt), no mocks. A test
is skipped only where its library does not import. What the integration tests rely on is checked here once:
every family's class names, a forward and backward with finite non-trivial values reaching every expert, bit-equal
weights and outputs for two builds with one seed (and in another process, whatever its torch RNG state), different
weights for another seed, and transformers' three CPU experts implementations agreeing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from tests import third_party as tp

torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torchtitan's router computes its logits under torch.autocast(dtype=float32): CPU autocast declines, with a warning
TITAN_AUTOCAST = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def torchtitan():
    return pytest.importorskip("torchtitan.models.common.moe")


def _forward(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out  # gpt-oss's GptOssMLP returns (output, router_scores)


def _run(model, x):
    """Output, input gradient and every parameter's gradient of ``sum(out * dy)`` (a fixed seeded ``dy``)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = _forward(model, x)
    (out * tp.tokens(out.shape, seed=7)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def _assert_runs_deterministically(build, x, experts_of):
    """Two builds: same parameters, bit-equal output and gradients, all finite and non-trivial, every expert used."""
    a, b = build(), build()
    _assert_same_params(a, b)
    out_a, dx_a, grads_a = _run(a, x)
    out_b, dx_b, grads_b = _run(b, x)
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert out_a.shape == x.shape and out_a.dtype == torch.float32
    assert torch.isfinite(out_a).all() and torch.isfinite(dx_a).all()
    assert out_a.abs().mean() > 1e-2, "the output is ~0: the weights' scale is too small"
    assert dx_a.abs().mean() > 1e-3
    for n, g in grads_a.items():
        assert g is not None, f"{n} got no gradient"
        assert torch.equal(g, grads_b[n]), n
        assert torch.isfinite(g).all(), n
    for n, p in experts_of(a).named_parameters():  # the expert dimension is dim 0: each expert got tokens
        g = p.grad.reshape(p.shape[0], -1)
        assert (g.abs().sum(dim=1) > 0).all(), f"an expert of {n} received no token: routing is degenerate"
    return a


@pytest.mark.parametrize("family", sorted(tp.FAMILIES))
def test_transformers_block_builds_runs_and_is_deterministic(transformers, family):
    module, _, block_cls, experts_cls = tp.FAMILIES[family]
    x = tp.tokens((4, 16, 32))
    block = _assert_runs_deterministically(lambda: tp.build_transformers_moe_block(family), x, lambda m: m.experts)
    assert type(block).__name__ == block_cls and type(block.experts).__name__ == experts_cls
    assert type(block).__module__ == f"transformers.models.{module}.modeling_{module}"
    assert block.experts.num_experts == 8 and block.experts.config._experts_implementation == "eager"
    other = tp.build_transformers_moe_block(family, seed=1)
    for (n, p), q in zip(block.named_parameters(), other.parameters()):
        assert not torch.equal(p, q), f"{n} does not depend on the seed"


@pytest.mark.parametrize("family", sorted(tp.FAMILIES))
def test_transformers_experts_implementations_agree(transformers, family):
    """eager (the per-expert loop), grouped_mm and batched_mm: the same output and gradients to fp32 rounding."""
    x = tp.tokens((4, 16, 32))
    runs = {impl: _run(tp.build_transformers_moe_block(family, experts_implementation=impl), x)
            for impl in tp.EXPERTS_IMPLEMENTATIONS}
    ref_out, ref_dx, ref_grads = runs["eager"]
    for impl in ("grouped_mm", "batched_mm"):
        out, dx, grads = runs[impl]
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6, msg=impl)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6, msg=impl)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-6, msg=f"{impl} {n}")


def test_transformers_experts_implementation_switches_on_a_built_block(transformers):
    block = tp.build_transformers_moe_block("qwen3_moe")
    x = tp.tokens((2, 8, 32))
    eager = _forward(block, x)
    block.experts.config._experts_implementation = "batched_mm"  # read at every call
    torch.testing.assert_close(_forward(block, x), eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="CPU ones"):
        tp.build_transformers_moe_block("qwen3_moe", experts_implementation="sonicmoe")
    with pytest.raises(ValueError, match="unknown transformers MoE family"):
        tp.build_transformers_moe_block("llama")


def test_qwen3_moe_causal_lm(transformers):
    ids = tp.token_ids((2, 12), vocab=64)
    a, b = tp.build_qwen3_moe_causal_lm(num_layers=2), tp.build_qwen3_moe_causal_lm(num_layers=2)
    assert type(a).__name__ == "Qwen3MoeForCausalLM"
    assert [type(layer.mlp).__name__ for layer in a.model.layers] == ["Qwen3MoeSparseMoeBlock"] * 2
    assert a.config._experts_implementation == "eager" and a.config._attn_implementation == "eager"
    _assert_same_params(a, b)
    losses = []
    for model in (a, b):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        assert out.logits.shape == (2, 12, 64)
    assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[0]) and losses[0] > 1.0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert torch.equal(p.grad, q.grad), n
    for layer in a.model.layers:
        g = layer.mlp.experts.gate_up_proj.grad.reshape(8, -1)
        assert (g.abs().sum(dim=1) > 0).all(), "an expert received no token"


@TITAN_AUTOCAST
@pytest.mark.parametrize("shared_experts", [False, True], ids=["routed", "with_shared"])
def test_torchtitan_moe(torchtitan, shared_experts):
    x = tp.tokens((4, 16, 32))
    build = lambda: tp.build_torchtitan_moe(shared_experts=shared_experts)
    moe = _assert_runs_deterministically(build, x, lambda m: m.routed_experts.inner_experts)
    assert isinstance(moe, torchtitan.MoE)
    experts = moe.routed_experts.inner_experts
    assert isinstance(experts, torchtitan.GroupedExperts)
    assert type(moe.routed_experts.token_dispatcher).__name__ == "LocalTokenDispatcher"
    assert {n: tuple(p.shape) for n, p in experts.named_parameters()} == {
        "w1_EFD": (8, 16, 32), "w2_EDF": (8, 32, 16), "w3_EFD": (8, 16, 32)}
    for n, p in moe.named_parameters():  # every parameter was drawn by init_states (none left as torch.empty)
        assert 0.07 < p.std().item() < 0.13 and p.mean().abs().item() < 0.05, n
    assert torch.equal(moe.expert_bias_E, torch.zeros(8))
    other = tp.build_torchtitan_moe(shared_experts=shared_experts, seed=1)
    for (n, p), q in zip(moe.named_parameters(), other.parameters()):
        assert not torch.equal(p, q), f"{n} does not depend on the seed"


@TITAN_AUTOCAST
def test_torchtitan_grouped_experts_rows_are_order_independent(torchtitan):
    """Its GroupedExperts computes in bfloat16: a row's output and input gradient are bit-equal whatever the order of
    the rows within their expert; the weight gradients are bit-equal only for the same order (the parity tests keep
    the reference's order)."""
    experts = tp.build_torchtitan_moe().routed_experts.inner_experts
    counts = torch.tensor([5, 9, 0, 12, 7, 3, 10, 18])
    rows, dy = tp.tokens((64, 32), seed=5), tp.tokens((64, 32), seed=6)
    g = torch.Generator().manual_seed(0)
    starts = torch.cumsum(counts, 0) - counts
    perm = torch.cat([s + torch.randperm(int(n), generator=g) for s, n in zip(starts.tolist(), counts.tolist())])

    def run(r, d, c, module=experts):
        r = r.clone().requires_grad_(True)
        out = module(r, c)
        (out * d).sum().backward()
        return out.detach(), r.grad

    out, dx = run(rows, dy, counts)
    out_p, dx_p = run(rows[perm], dy[perm], counts)
    assert torch.equal(out_p, out[perm]) and torch.equal(dx_p, dx[perm])
    # the rows of experts 4..7 alone, on a module of those 4 experts (an EP shard): bit-equal
    shard = torchtitan.GroupedExperts(torchtitan.GroupedExperts.Config(dim=32, hidden_dim=16, num_experts=4))
    with torch.no_grad():
        for n, p in shard.named_parameters():
            p.copy_(getattr(experts, n)[4:])
    first = int(counts[:4].sum())
    out_s, dx_s = run(rows[first:], dy[first:], counts[4:], shard)
    assert torch.equal(out_s, out[first:]) and torch.equal(dx_s, dx[first:])
    # bfloat16 compute: close to an fp64 reference only to ~1e-2
    w1, w2, w3 = (getattr(experts, n).detach().double() for n in ("w1_EFD", "w2_EDF", "w3_EFD"))
    expert_of_row = torch.repeat_interleave(torch.arange(8), counts)
    r64 = rows.double()
    ref = torch.stack([(torch.nn.functional.silu(w1[e] @ r) * (w3[e] @ r)) @ w2[e].T
                       for r, e in zip(r64, expert_of_row.tolist())])
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert 1e-5 < err < 3e-2


_DIGESTS = """
import hashlib, sys
import torch
sys.path.insert(0, {repo!r})
torch.manual_seed(1234)  # a different torch RNG state than the test process: the builders must not depend on it
from tests import third_party as tp
models = [tp.build_transformers_moe_block(f) for f in sorted(tp.FAMILIES)]
models += [tp.build_qwen3_moe_causal_lm(), tp.build_torchtitan_moe(shared_experts=True)]
for m in models:
    h = hashlib.sha256()
    for n, p in m.named_parameters():
        h.update(n.encode()); h.update(p.detach().numpy().tobytes())
    print(h.hexdigest())
"""


def _digest(model) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        h.update(n.encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def test_same_weights_in_another_process(transformers, torchtitan):
    """What every rank of a parity test relies on: one seed, the same weights in every process."""
    torch.manual_seed(99)
    models = [tp.build_transformers_moe_block(f) for f in sorted(tp.FAMILIES)]
    models += [tp.build_qwen3_moe_causal_lm(), tp.build_torchtitan_moe(shared_experts=True)]
    here = [_digest(m) for m in models]
    proc = subprocess.run([sys.executable, "-c", _DIGESTS.format(repo=REPO)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == here
    assert len(set(here)) == len(here)  # and no two families share their weights
