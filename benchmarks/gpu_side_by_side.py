"""Routed experts side by side with torchtitan 0.3.0's and Megatron-Core's all-to-all token dispatchers (issue 15,
item 6).

    python -m hyper_parallel.launch --nproc 2 --backend torch benchmarks/gpu_side_by_side.py \
        [--shapes deepseek,qwen] [--out DIR]

Both pipelines take the same tokens ``[T, D]`` (bf16), the same routing (``top_k`` distinct experts per token and
their scores) and the same local expert weights, and return the tokens' outputs ``[T, D]``:

* torchtitan: ``AllToAllTokenDispatcher.dispatch`` (sort the pairs, exchange the counts, the tokens, permute), its
  ``GroupedExperts``, ``AllToAllTokenDispatcher.combine`` (unpermute, exchange back, weight, scatter-add); torchtitan's
  "partial_dtensor" SPMD backend, so the exchanges are ``torch.distributed``'s functional ``all_to_all_single``;
* Megatron-Core (where it imports: it needs Python >= 3.12): ``MoEAlltoAllTokenDispatcher`` (``dispatch_preprocess``,
  ``token_dispatch``, ``dispatch_postprocess``; ``combine_*`` the same way back) on its PyTorch path (no fused
  permutation, which needs Transformer Engine), around the same experts as ours, the scores applied to the expert
  outputs as Megatron's experts do; its routing map and probabilities (its router's output form) are built once,
  outside the timings;
* ours: ``TokenReorderer``, ``Kernels.gather_pairs``, ``token_dispatch``, ``swiglu_experts``, ``token_combine``,
  ``Kernels.combine_pairs`` (the pair kernels fused on CUDA; ``--pairs-impl reference`` for the neutral ones).

Correctness first: each pipeline's output and gradients (tokens and the three weights) against an fp32 run of the
same math (ours, in fp32); then, alternating the two pipelines, the token path alone (experts replaced by the
identity: what the two libraries do differently) forward, and the whole routed-experts layer forward + backward.
Times are CUDA-event medians, the max over ranks. Runs on CPU under gloo with ``--shapes tiny`` (a smoke test).
Needs torchtitan 0.3.0 (``pip install --no-deps torchtitan==0.3.0 spmd_types tyro``); Megatron-Core is optional.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "benchmarks")]
os.environ.setdefault("HYPER_PARALLEL_PLATFORM", "torch")

import gpu_common as common  # noqa: E402  (shapes, the device, the clock, rel_err)
import torch  # noqa: E402

if not hasattr(torch.compiler, "_is_non_strict_tracing"):
    # torchtitan 0.3.0 asks this of torch >= 2.12; on an older torch (the GPU machines' 2.11) nothing here is traced
    torch.compiler._is_non_strict_tracing = lambda: False
from torchtitan.distributed.utils import set_spmd_backend  # noqa: E402
from torchtitan.models.common.moe import GroupedExperts as TitanExperts  # noqa: E402
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher  # noqa: E402

from hyper_parallel import get_platform, init_device_mesh  # noqa: E402
from hyper_parallel.expert_parallel.dispatch import token_combine, token_dispatch  # noqa: E402
from hyper_parallel.moe.experts import swiglu_experts  # noqa: E402
from hyper_parallel.moe.torch import TokenReorderer  # noqa: E402

BF16 = torch.bfloat16


def routing(shape, T: int, seed: int, dev):
    """``top_k`` distinct experts per token (uniform) and their softmax scores, fp32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids_TK = torch.rand(T, shape.experts, generator=g).topk(shape.top_k, dim=1).indices
    scores_TK = torch.randn(T, shape.top_k, generator=g).softmax(-1)
    return scores_TK.to(dev), ids_TK.to(dev)


class Ours:
    """Our token path around ``experts(rows, host counts)``."""

    def __init__(self, shape, group, experts):
        self.shape, self.group, self.experts = shape, group, experts
        self.reorderer = TokenReorderer(num_experts=shape.experts, top_k=shape.top_k)

    def __call__(self, x_TD, scores_TK, ids_TK):
        p, K = get_platform(), self.shape.top_k
        scores_N, pairs_N, counts_G = self.reorderer(scores_TK, ids_TK)
        d = token_dispatch(p.kernels.gather_pairs(x_TD, pairs_N, K), counts_G, self.group,
                           num_experts=self.shape.experts)
        back_ND = token_combine(self.experts(d.routed_input, d.num_tokens_per_expert), d.meta)
        return p.kernels.combine_pairs(back_ND, scores_N, pairs_N, x_TD.shape[0], K)


class Titan:
    """torchtitan 0.3.0's token path around ``experts(rows, device counts)``."""

    def __init__(self, shape, ep_mesh, experts):
        self.shape, self.experts = shape, experts
        self.dispatcher = AllToAllTokenDispatcher(AllToAllTokenDispatcher.Config(num_experts=shape.experts,
                                                                                  top_k=shape.top_k))
        self.dispatcher.wire_meshes(ep_mesh=ep_mesh)

    def __call__(self, x_TD, scores_TK, ids_TK):
        counts_G = torch.bincount(ids_TK.reshape(-1), minlength=self.shape.experts)
        rows, counts_e, meta = self.dispatcher.dispatch(x_TD, scores_TK, ids_TK, counts_G)
        return self.dispatcher.combine(self.experts(rows, counts_e), meta, x_TD)


def megatron_or_reason():
    """Megatron-Core's pieces, or why they do not import here (a string)."""
    try:
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
        from megatron.core.transformer.transformer_config import TransformerConfig
    except Exception as e:  # noqa: BLE001 - any import failure only leaves Megatron out of the comparison
        return f"{type(e).__name__}: {e}"
    return parallel_state, ProcessGroupCollection, MoEAlltoAllTokenDispatcher, TransformerConfig


class Megatron:
    """Megatron-Core's all-to-all token path around ``experts(rows, host counts)``, scores on the expert outputs."""

    def __init__(self, shape, world: int, rank: int, experts, pieces):
        parallel_state, ProcessGroupCollection, Dispatcher, TransformerConfig = pieces
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
        E = shape.experts // world
        config = TransformerConfig(
            num_layers=1, hidden_size=shape.dim, num_attention_heads=8, ffn_hidden_size=shape.hidden,
            moe_ffn_hidden_size=shape.hidden, num_moe_experts=shape.experts, moe_router_topk=shape.top_k,
            expert_model_parallel_size=world, moe_token_dispatcher_type="alltoall", moe_permute_fusion=False,
            bf16=True, params_dtype=BF16, add_bias_linear=False, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, use_cpu_initialization=True)
        self.dispatcher = Dispatcher(E, list(range(rank * E, (rank + 1) * E)), config,
                                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        self.shape, self.experts, self.routing = shape, experts, None

    def prepare(self, scores_TK, ids_TK) -> None:
        T, G = ids_TK.shape[0], self.shape.experts
        routing_map = torch.zeros(T, G, dtype=torch.bool, device=ids_TK.device).scatter_(1, ids_TK, True)
        probs = torch.zeros(T, G, dtype=scores_TK.dtype, device=ids_TK.device).scatter_(1, ids_TK, scores_TK)
        self.routing = (routing_map, probs)

    def __call__(self, x_TD, scores_TK, ids_TK):
        d = self.dispatcher
        rows, probs = d.dispatch_preprocess(x_TD, *self.routing)
        rows, probs = d.token_dispatch(rows, probs)
        rows, counts, probs = d.dispatch_postprocess(rows, probs)
        y = self.experts(rows, [int(c) for c in counts.tolist()])
        y = (y.float() * probs.unsqueeze(-1)).to(y.dtype)
        return d.combine_postprocess(d.token_combine(d.combine_preprocess(y)))


def fwd_bwd(fn, x, scores, ids, gy, params):
    x = x.detach().requires_grad_()
    for w in params:
        w.grad = None
    out = fn(x, scores, ids)
    out.backward(gy)
    return out.detach(), [x.grad, *(w.grad for w in params)]


def run_shape(name: str, shape, p, mesh, titan_mesh, megatron, clock, args) -> dict:
    dev, rank, world = common.DEV, p.get_rank(), p.get_world_size()
    T, D, H, E = shape.tokens, shape.dim, shape.hidden, shape.experts // world
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    randn = lambda *size, scale=1.0: (torch.randn(*size, generator=g, device=dev, dtype=BF16) * scale)  # noqa: E731
    # bf16 weights for all (torchtitan casts its weights to bf16 in forward; kept in bf16 here, as under FSDP's
    # mixed precision), the fp32 reference on the same values
    ws16 = [randn(E, H, D, scale=D ** -0.5), randn(E, D, H, scale=H ** -0.5), randn(E, H, D, scale=D ** -0.5)]
    x16, gy16 = randn(T, D), randn(T, D)
    scores, ids = routing(shape, T, 2000 + rank, dev)

    titan_experts = TitanExperts(TitanExperts.Config(dim=D, hidden_dim=H, num_experts=E)).to(device=dev, dtype=BF16)
    titan_params = [titan_experts.w1_EFD, titan_experts.w2_EDF, titan_experts.w3_EFD]
    with torch.no_grad():
        for param, w in zip(titan_params, ws16):
            param.copy_(w)
    ws16 = [w.requires_grad_() for w in ws16]
    group = mesh.get_group()
    ours_experts = lambda rows, counts: swiglu_experts(rows, counts, *ws16)  # noqa: E731
    identity = lambda rows, counts: rows  # noqa: E731
    # label: (layer, token path alone, the layer's parameters)
    pipelines = {"ours": (Ours(shape, group, ours_experts), Ours(shape, group, identity), ws16),
                 "torchtitan": (Titan(shape, titan_mesh, titan_experts), Titan(shape, titan_mesh, identity),
                                titan_params)}
    if not isinstance(megatron, str):
        try:
            layer, tokens = (Megatron(shape, world, rank, fn, megatron) for fn in (ours_experts, identity))
        except Exception as e:  # noqa: BLE001 - a Megatron release whose config refuses this setup: reported
            megatron = f"{type(e).__name__}: {e}"
        else:
            for m in (layer, tokens):
                m.prepare(scores, ids)
            pipelines["megatron"] = (layer, tokens, ws16)

    result = {"shape": name, "world": world, "pipelines": list(pipelines), "pairs_impl": p.kernels.pairs_impl,
              "checks": {}, "times": {}}
    if isinstance(megatron, str):
        result["megatron_left_out"] = megatron
    # correctness, one pipeline at a time (a DeepSeek set of weights and gradients in fp32 is 45 GB per GPU)
    # (through the neutral pair references, so a fused pair kernel is checked against them)
    ws_ref = [w.detach().float().requires_grad_() for w in ws16]
    impl, p.kernels.pairs_impl = p.kernels.pairs_impl, "reference"
    want = fwd_bwd(Ours(shape, group, lambda rows, counts: swiglu_experts(rows, counts, *ws_ref)),
                   x16.float(), scores, ids, gy16.float(), ws_ref)
    p.kernels.pairs_impl = impl
    del ws_ref
    for label, (fn, _, params) in pipelines.items():
        got = fwd_bwd(fn, x16, scores, ids, gy16, params)
        for what, a, b in zip(("out", "dx", "dw1", "dw2", "dw3"), (got[0], *got[1]), (want[0], *want[1])):
            result["checks"][f"{label}_bf16_vs_fp32_{what}_rel_err"] = common.rel_err(a, b)
        del got
        for w in params:
            w.grad = None
    del want
    common.release()

    n_it, n_w = args.iters, args.warmup
    with torch.no_grad():
        ours_out = pipelines["ours"][1](x16, scores, ids)
        for label, (_, tokens, _) in pipelines.items():
            if label != "ours":
                # not bit-equal: torchtitan and Megatron weight each pair in bf16, ours sums the pairs in fp32
                result["checks"][f"token_path_ours_vs_{label}_rel_err"] = common.rel_err(tokens(x16, scores, ids),
                                                                                          ours_out)
        del ours_out
        for _ in range(args.rounds):
            for label, (_, tokens, _) in pipelines.items():
                t = clock.time(lambda fn=tokens: fn(x16, scores, ids), n_it, n_w)
                result["times"].setdefault(f"token_path_fwd_{label}", []).append(t["us"])
    for _ in range(args.rounds):
        for label, (fn, _, params) in pipelines.items():
            t = clock.time(lambda fn=fn, params=params: fwd_bwd(fn, x16, scores, ids, gy16, params),
                           args.layer_iters, 2)
            result["times"].setdefault(f"layer_fwd_bwd_{label}", []).append(t["us"])
    common.release()
    return result


def report(results: list[dict]) -> None:
    others = [label for label in results[0]["pipelines"] if label != "ours"]
    print("| shape | GPUs | step | ours (us) | " + " | ".join(f"{o} (us) | {o} / ours" for o in others) + " |")
    print("|---|---|---|---:|" + "---:|---:|" * len(others))
    for r in results:
        for step in ("token_path_fwd", "layer_fwd_bwd"):
            for i, ours in enumerate(r["times"][f"{step}_ours"]):
                cells = " | ".join(f"{r['times'][f'{step}_{o}'][i]:.1f} | {r['times'][f'{step}_{o}'][i] / ours:.2f}"
                                   for o in others)
                print(f"| {r['shape']} | {r['world']} | {step} | {ours:.1f} | {cells} |")
    print()
    for r in results:
        if "megatron_left_out" in r:
            print(f"Megatron-Core left out: {r['megatron_left_out']}")
        for key, value in r["checks"].items():
            print(f"check {r['shape']} {key}: {value}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="deepseek,qwen", help="comma-separated: " + ", ".join(common.SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layer-iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the pipelines")
    ap.add_argument("--out", default=None, help="directory for gpu_side_by_side_<shape>.json")
    ap.add_argument("--pairs-impl", default="auto", choices=["auto", "reference"],
                    help="our gather_pairs / combine_pairs: the fused kernels on CUDA (auto) or the references")
    args = ap.parse_args(argv)
    p = get_platform()
    p.kernels.pairs_impl = args.pairs_impl
    p.init_process_group()
    common.DEV = p.device
    set_spmd_backend("partial_dtensor")  # torchtitan's plain-collective path (no spmd_types mesh context)
    mesh = init_device_mesh(p.device.type, (p.get_world_size(),), mesh_dim_names=("ep",))
    titan_mesh = torch.distributed.device_mesh.init_device_mesh(p.device.type, (p.get_world_size(),),
                                                               mesh_dim_names=("ep",))
    clock = common.Clock(p)
    megatron = megatron_or_reason()
    results = []
    for name in args.shapes.split(","):
        results.append(run_shape(name, common.SHAPES[name], p, mesh, titan_mesh, megatron, clock, args))
        if args.out and p.get_rank() == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"gpu_side_by_side_{name}.json"), "w") as f:
                json.dump(results[-1], f, indent=1)
    if p.get_rank() == 0:
        report(results)
    p.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
