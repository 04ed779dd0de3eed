"""The demo's synthetic, learnable task, in NumPy so every framework and every rank sees bit-identical data.

A fixed random *teacher* Mixture-of-Experts (softly gated, so the target is smooth and learnable) maps each token
``x`` (``dim`` values drawn from N(0, 1)) to

    y = x + 2 * sum_e softmax(G x)_e * W2[e] tanh(W1[e] x)

and the student MoE stack (top-k routed) learns to reproduce ``y``. Step ``s`` draws a fresh global batch from a
generator seeded with ``(seed, 1, s)``; data-parallel rank ``i`` of ``n`` takes rows
``[i * tokens / n, (i + 1) * tokens / n)``, so the shards are deterministic and their union is exactly the batch the
single-process reference trains on.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TeacherTask"]


class TeacherTask:
    """The teacher and the batches (see the module docstring)."""

    def __init__(self, *, dim: int, experts: int, hidden: int, tokens: int, seed: int):
        rng = np.random.default_rng((seed, 0x7EAC))
        self.dim, self.tokens, self.seed = dim, tokens, seed
        self.gate_ED = rng.standard_normal((experts, dim)) * 0.3
        self.w1_EHD = rng.standard_normal((experts, hidden, dim)) / np.sqrt(dim)
        self.w2_EDH = rng.standard_normal((experts, dim, hidden)) / np.sqrt(hidden)

    def target(self, x_TD: np.ndarray) -> np.ndarray:
        """The teacher's output for tokens ``x_TD`` (float64)."""
        logits_TE = x_TD @ self.gate_ED.T
        gate_TE = np.exp(logits_TE - logits_TE.max(1, keepdims=True))
        gate_TE /= gate_TE.sum(1, keepdims=True)
        h_TEH = np.tanh(np.einsum("ehd,td->teh", self.w1_EHD, x_TD))
        return x_TD + 2.0 * np.einsum("te,edh,teh->td", gate_TE, self.w2_EDH, h_TEH)

    def batch(self, step: int, shard: int = 0, num_shards: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` float32 ``[tokens / num_shards, dim]``: this shard of step ``step``'s global batch."""
        if self.tokens % num_shards or not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} of {num_shards}: the {self.tokens} tokens must split evenly")
        x_TD = np.random.default_rng((self.seed, 1, step)).standard_normal((self.tokens, self.dim))
        n = self.tokens // num_shards
        x_TD = x_TD[shard * n:(shard + 1) * n]
        return x_TD.astype(np.float32), self.target(x_TD).astype(np.float32)
