"""The MoE layer keeps its input's dtype: bf16 tokens in, bf16 out (the routed experts' weighted sum over the top-k is
taken in float32 and cast back), close to the float32 layer; single device and expert parallel (torch, gloo)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("torch_in_process")


def _layer_and_input(dtype):
    import torch

    from hyper_parallel.moe import MoE

    moe = MoE(dim=16, hidden_dim=32, num_experts=8, top_k=2, num_shared_experts=1, init_std=0.3, seed=0)
    x = torch.from_numpy(np.random.RandomState(0).randn(24, 16).astype(np.float32))
    return moe.to(dtype), x.to(dtype).requires_grad_()


def test_bf16_in_bf16_out_close_to_float32():
    import torch

    moe16, x16 = _layer_and_input(torch.bfloat16)
    moe32, x32 = _layer_and_input(torch.float32)
    out16, out32 = moe16(x16), moe32(x32)
    assert out16.dtype == torch.bfloat16 and out32.dtype == torch.float32
    out16.float().square().sum().backward()
    out32.square().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and moe16.experts.w1.grad.dtype == torch.bfloat16
    scale = out32.abs().max().item()
    assert (out16.float() - out32).abs().max().item() <= 0.03 * scale  # bf16 has 8 bits of mantissa
    g32 = moe32.experts.w1.grad
    assert (moe16.experts.w1.grad.float() - g32).abs().max().item() <= 0.05 * g32.abs().max().item()


def test_combine_pairs_weights_and_sums_in_float32():
    """The kernel's reference against NumPy: unique pairs, a token with no kept pair, bf16 rows with float32 scores."""
    import torch

    from hyper_parallel import get_platform

    rng = np.random.RandomState(1)
    T, K, D = 5, 2, 3
    pairs = np.array([0, 3, 4, 7, 9, 1])  # token 4's pairs (8, 9): one kept; token 2 (4, 5): one; all of 0, 1
    rows = rng.randn(len(pairs), D).astype(np.float32)
    scores = rng.rand(len(pairs)).astype(np.float32)
    want = np.zeros((T * K, D), np.float32)
    want[pairs] = rows * scores[:, None]
    want = want.reshape(T, K, D).sum(1)
    kernels = get_platform().kernels
    got = kernels.combine_pairs(torch.from_numpy(rows), torch.from_numpy(scores), torch.from_numpy(pairs), T, K)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    got16 = kernels.combine_pairs(torch.from_numpy(rows).bfloat16(), torch.from_numpy(scores),
                                  torch.from_numpy(pairs), T, K)
    assert got16.dtype == torch.bfloat16
    rows16 = torch.from_numpy(rows).bfloat16().float().numpy()
    want16 = np.zeros((T * K, D), np.float32)
    want16[pairs] = rows16 * scores[:, None]
    # one rounding to bf16 at the end, not one per product and per partial sum
    np.testing.assert_array_equal(got16.float().numpy(),
                                  torch.from_numpy(want16.reshape(T, K, D).sum(1)).bfloat16().float().numpy())


def test_fused_swiglu_of_the_cuda_path_matches_the_reference():
    """``TorchKernels.swiglu`` runs ``F.silu(h) * g`` on CUDA; the same function on CPU tensors against the neutral
    ``h * sigmoid(h) * g``, values and gradients, fp32 and bf16."""
    import torch

    from hyper_parallel.kernels import Kernels
    from platform_adapters.torch import swiglu_fused

    rng = np.random.RandomState(2)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        h0, g0 = (torch.from_numpy(rng.randn(64, 48).astype(np.float32) * 3).to(dtype) for _ in range(2))
        outs, grads = [], []
        for fn in (swiglu_fused, lambda h, g: Kernels.swiglu(None, h, g)):
            h, g = h0.clone().requires_grad_(), g0.clone().requires_grad_()
            y = fn(h, g)
            y.float().square().sum().backward()
            outs.append(y.float())
            grads.append((h.grad.float(), g.grad.float()))
        assert outs[0].dtype == outs[1].dtype
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)
        for a, b in zip(grads[0], grads[1]):
            torch.testing.assert_close(a, b, rtol=tol * 4, atol=tol * 4)
