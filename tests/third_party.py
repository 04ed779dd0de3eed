"""Tiny third-party MoE models for the integration tests: Hugging Face transformers 5.x and torchtitan 0.3.0.

Every builder makes its model from a config (no download), in float32 on CPU, and sets every parameter from NumPy's
generator seeded with ``(seed, crc32(family + parameter name))``: the same weights in every process and on every rank,
whatever the torch RNG state, the build order or the number of parameters before it (torchtitan's through its own
``param_init`` / ``init_states``). The scale is not the libraries' 0.02 but ``std`` (0.1): router logits of about 0.5
on unit-variance tokens, so routing reaches every expert with unequal weights, and outputs of order 0.01-0.1 instead
of ~0. Biases (gpt-oss's experts and router) are drawn too, never zero, and normalization weights are
``1 + std * N(0, 1)``. The configs are tiny: a block's forward takes about a millisecond.

    block = build_transformers_moe_block("qwen3_moe")           # Qwen3MoeSparseMoeBlock, 8 experts, top-2
    lm = build_qwen3_moe_causal_lm(num_layers=2)                  # a whole Qwen3MoeForCausalLM
    moe = build_torchtitan_moe()                                  # torchtitan.models.common.moe.MoE
    x = tokens((2, 6, 32))                                        # seeded unit-variance inputs

transformers and torchtitan are imported inside the builders only: importing this module needs neither.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

#: ``family -> (modeling module, config class, sparse MoE block class, experts class)``, transformers 5.x names.
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", "Qwen3MoeExperts"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock", "Qwen2MoeExperts"),
    "mixtral": ("mixtral", "MixtralConfig", "MixtralSparseMoeBlock", "MixtralExperts"),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", "DeepseekV3MoE", "DeepseekV3Experts"),
    "olmoe": ("olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock", "OlmoeExperts"),
    "gpt_oss": ("gpt_oss", "GptOssConfig", "GptOssMLP", "GptOssExperts"),
}
#: The experts implementations of transformers 5.x that run on CPU in fp32 (``deepgemm`` / ``sonicmoe`` need CUDA).
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
STD = 0.1


def _normal(key: str, shape, seed: int, std: float) -> np.ndarray:
    """``std * N(0, 1)`` of ``shape`` from NumPy's generator seeded by ``(seed, crc32(key))``: process-independent."""
    rng = np.random.default_rng((seed, zlib.crc32(key.encode())))
    return (rng.standard_normal(tuple(shape)) * std).astype(np.float32)


def _is_norm(module) -> bool:
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def init_params(module, *, seed: int = 0, std: float = STD, salt: str = "") -> None:
    """Overwrite every parameter of ``module`` (a torch ``nn.Module``) with seeded values, keyed by ``salt`` + its name.

    Normalization weights get ``1 + std * N(0, 1)``, every other parameter (weights, biases, attention sinks)
    ``std * N(0, 1)``. Buffers are left as the model made them (rotary tables, DeepSeek-V3's zero
    ``e_score_correction_bias``). The builders salt with the family, so two families that name their parameters
    alike (Qwen3-MoE and Mixtral) still get different weights.
    """
    import torch

    norms = {name for name, m in module.named_modules() if _is_norm(m)}
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner = name.rpartition(".")[0]
            values = _normal(salt + name, p.shape, seed, std)
            if owner in norms and name.endswith("weight"):
                values = values + np.float32(1.0)
            p.copy_(torch.from_numpy(values))


def tokens(shape, *, seed: int = 1, std: float = 1.0):
    """A float32 torch tensor of ``std * N(0, 1)`` of ``shape``, the same in every process."""
    import torch

    return torch.from_numpy(_normal("tokens", shape, seed, std))


def token_ids(shape, *, vocab: int, seed: int = 1):
    """An int64 torch tensor of token ids in ``[0, vocab)`` of ``shape``, the same in every process."""
    import torch

    rng = np.random.default_rng((seed, zlib.crc32(b"token_ids")))
    return torch.from_numpy(rng.integers(0, vocab, size=tuple(shape), dtype=np.int64))


# --- transformers -----------------------------------------------------------------------------------------------------


def _transformers_attr(family: str, index: int):
    import importlib

    if family not in FAMILIES:
        raise ValueError(f"unknown transformers MoE family {family!r}; known: {sorted(FAMILIES)}")
    module = importlib.import_module(f"transformers.models.{FAMILIES[family][0]}.modeling_{FAMILIES[family][0]}")
    if index == 1:  # the config class lives in the configuration module, re-exported by the package
        return getattr(importlib.import_module(f"transformers.models.{FAMILIES[family][0]}"), FAMILIES[family][1])
    return getattr(module, FAMILIES[family][index])


def transformers_config(family: str, *, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
                        intermediate: int = 16, num_layers: int = 1, vocab: int = 64,
                        experts_implementation: str = "eager"):
    """The tiny config of ``family``: ``num_experts`` experts of ``hidden -> intermediate -> hidden``, top-``top_k``.

    Family specifics, as their released checkpoints have them: Qwen3-MoE and DeepSeek-V3 renormalize the top-k
    weights (``norm_topk_prob=True``), Qwen2-MoE and OLMoE do not, Mixtral always does, gpt-oss softmaxes its top-k
    logits. Qwen2-MoE has a gated shared expert of ``2 * intermediate``; DeepSeek-V3 one shared expert of
    ``intermediate``, ``routed_scaling_factor`` 2.5, and group-limited routing (4 groups, the best 2 kept, when
    ``num_experts`` is a multiple of 4 and at least 8; else one group). Attention sizes (only used by a whole model):
    4 heads, 2 key/value heads, head dim ``hidden // 4``.
    """
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation={experts_implementation!r}; CPU ones: {EXPERTS_IMPLEMENTATIONS}")
    common = dict(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab, max_position_embeddings=64, num_experts_per_tok=top_k, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)
    if family == "qwen3_moe":
        kw = dict(num_experts=num_experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
                  norm_topk_prob=True, head_dim=hidden // 4)
    elif family == "qwen2_moe":
        kw = dict(num_experts=num_experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
                  shared_expert_intermediate_size=2 * intermediate, norm_topk_prob=False)
    elif family == "mixtral":
        kw = dict(num_local_experts=num_experts, intermediate_size=intermediate, head_dim=hidden // 4)
    elif family == "deepseek_v3":
        groups = 4 if num_experts % 4 == 0 and num_experts >= 8 else 1
        kw = dict(n_routed_experts=num_experts, moe_intermediate_size=intermediate, intermediate_size=2 * intermediate,
                  n_shared_experts=1, n_group=groups, topk_group=2 if groups == 4 else 1, norm_topk_prob=True,
                  routed_scaling_factor=2.5, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    elif family == "olmoe":
        kw = dict(num_experts=num_experts, intermediate_size=intermediate, norm_topk_prob=False)
    elif family == "gpt_oss":
        kw = dict(num_local_experts=num_experts, intermediate_size=intermediate, head_dim=hidden // 4,
                  layer_types=["full_attention"] * num_layers,
                  rope_parameters={"rope_type": "default", "rope_theta": 150000.0})  # YaRN's 4096 > 64 positions
    else:
        raise ValueError(f"unknown transformers MoE family {family!r}; known: {sorted(FAMILIES)}")
    config = _transformers_attr(family, 1)(**common, **kw)
    config._experts_implementation = experts_implementation
    return config


def build_transformers_moe_block(family: str, *, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
                                 intermediate: int = 16, seed: int = 0, std: float = STD,
                                 experts_implementation: str = "eager"):
    """The sparse MoE block of ``family`` (see :data:`FAMILIES`), float32, seeded weights (:func:`init_params`).

    Its experts module is ``block.experts``; their implementation (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``) is
    ``block.experts.config._experts_implementation``, set here because a block built outside a model would otherwise
    have ``None`` (transformers then warns and runs eager). Input ``[B, L, hidden]``; output the same shape (gpt-oss's
    ``GptOssMLP`` returns ``(output, router_scores)``).
    """
    config = transformers_config(family, num_experts=num_experts, top_k=top_k, hidden=hidden,
                                 intermediate=intermediate, experts_implementation=experts_implementation)
    block = _transformers_attr(family, 2)(config).float()
    init_params(block, seed=seed, std=std, salt=f"{family}.")
    return block


def build_qwen3_moe_causal_lm(num_layers: int = 2, *, num_experts: int = 8, top_k: int = 2, hidden: int = 32,
                              intermediate: int = 16, vocab: int = 64, seed: int = 0, std: float = STD,
                              experts_implementation: str = "eager", attn_implementation: str = "eager"):
    """A whole ``Qwen3MoeForCausalLM`` of ``num_layers`` MoE layers, float32, seeded weights (:func:`init_params`).

    ``model(input_ids=ids, labels=ids).loss`` is its LM loss; its MoE blocks are ``model.model.layers[i].mlp``.
    """
    from transformers import Qwen3MoeForCausalLM

    config = transformers_config("qwen3_moe", num_experts=num_experts, top_k=top_k, hidden=hidden,
                                 intermediate=intermediate, num_layers=num_layers, vocab=vocab,
                                 experts_implementation=experts_implementation)
    config._attn_implementation = attn_implementation
    model = Qwen3MoeForCausalLM(config).float()
    model.set_experts_implementation(experts_implementation)
    init_params(model, seed=seed, std=std, salt="qwen3_moe_causal_lm.")
    return model


# --- torchtitan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seeded:
    """A torchtitan ``param_init`` callable: copies the seeded values of ``key`` into the parameter it is given."""

    key: str
    seed: int
    std: float

    def __call__(self, param) -> None:
        import torch

        with torch.no_grad():
            param.copy_(torch.from_numpy(_normal(self.key, param.shape, self.seed, self.std)))


def build_torchtitan_moe(*, num_experts: int = 8, top_k: int = 2, dim: int = 32, hidden_dim: int = 16, seed: int = 0,
                         std: float = STD, score_func: str = "softmax", route_norm: bool = False,
                         shared_experts: bool = False, load_balance_coeff: float | None = 1e-3):
    """torchtitan 0.3.0's ``MoE`` built from its ``Config`` dataclasses and initialised by its own ``init_states``.

    ``MoE.Config(routed_experts=RoutedExperts.Config(inner_experts=GroupedExperts.Config(...),
    token_dispatcher=LocalTokenDispatcher.Config(...)), router=TokenChoiceTopKRouter.Config(gate=Linear.Config(...)),
    shared_experts=FeedForward.Config(...) or None)``; every parameter's ``param_init`` is a seeded NumPy draw keyed by
    its name within the MoE (``w1_EFD`` ``[E, F, D]``, ``w2_EDF`` ``[E, D, F]``, ``w3_EFD``, ``router.gate.weight``
    ``[E, D]``, ``shared_experts.w{1,2,3}.weight``), so ``init_states`` leaves no ``torch.empty`` garbage and no
    torch-RNG dependence. Buffers: ``expert_bias_E`` (when ``load_balance_coeff``) and ``tokens_per_expert_E``, zeros.
    Input ``[B, L, dim]``. Note its ``GroupedExperts`` computes in bfloat16 whatever its weights' dtype.
    """
    import torch
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    def seeded(prefix: str, *names: str) -> dict:
        return {n: _Seeded(f"torchtitan.{prefix}{n}", seed, std) for n in names}

    shared = None
    if shared_experts:
        shared = FeedForward.Config(
            w1=Linear.Config(in_features=dim, out_features=hidden_dim,
                             param_init=seeded("shared_experts.w1.", "weight")),
            w2=Linear.Config(in_features=hidden_dim, out_features=dim,
                             param_init=seeded("shared_experts.w2.", "weight")),
            w3=Linear.Config(in_features=dim, out_features=hidden_dim,
                             param_init=seeded("shared_experts.w3.", "weight")))
    config = MoE.Config(
        num_experts=num_experts,
        load_balance_coeff=load_balance_coeff,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(
                dim=dim, hidden_dim=hidden_dim, num_experts=num_experts,
                param_init=seeded("routed_experts.inner_experts.", "w1_EFD", "w2_EDF", "w3_EFD")),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=top_k)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=num_experts, top_k=top_k, score_func=score_func, route_norm=route_norm,
            gate=Linear.Config(in_features=dim, out_features=num_experts, param_init=seeded("router.gate.", "weight"))),
        shared_experts=shared,
    )
    moe = config.build()
    moe.init_states(buffer_device=torch.device("cpu"))
    return moe
