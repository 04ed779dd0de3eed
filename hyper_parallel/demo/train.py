"""What every rank of a demo run executes: ``python -m hyper_parallel.demo.train SPEC_JSON``.

Framework-neutral: the model is built from :class:`~hyper_parallel.moe.MoE` layers for the active backend, the
gradients come from ``Platform.value_and_grad``, and the optimizer is plain SGD with momentum written with tensor
arithmetic and ``Platform.replace_parameter``.

One training step on a rank:

1. take this rank's shard of the step's global batch (:class:`~hyper_parallel.demo.task.TeacherTask`);
2. ``loss = sum((model(x) - y)^2) / (global tokens * dim)``, so the sum of the ranks' losses over the data axis
   is the mean over the whole global batch, and its gradient is the global-batch gradient;
3. ONE ``all_reduce`` over the data (``ep``) axis carries, flattened together: the gradients of the replicated
   parameters (router gates, shared experts), the loss, and the per-expert token loads. Sharded expert weights
   need none: dispatch brings every data shard's tokens to them, so their gradients are complete already;
4. SGD with momentum on every parameter; the expert bias (DeepSeek-V3 aux-loss-free balancing) moves from the
   global loads.

Rank 0 prints one ``@@hpdemo {json}`` line per step (loss, step time, loads) for the driver to read. After each
step listed in ``RunSpec.memory_steps`` (1-based), every rank also prints a ``memory`` record with its current
resident memory (:func:`resident_mib`), which the soak (:mod:`hyper_parallel.bench.soak`) reads.
"""

from __future__ import annotations

import json
import os
import sys
import time

from hyper_parallel import (
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
)
from hyper_parallel.demo.config import RunSpec
from hyper_parallel.demo.model import build_model
from hyper_parallel.demo.task import TeacherTask
from hyper_parallel.moe import update_expert_bias

RECORD_PREFIX = "@@hpdemo "


def resident_mib() -> tuple[float, str]:
    """This process's resident memory in MiB, and which figure it is.

    ``"current"``: the resident set size now (Linux ``/proc/self/statm``), which falls when memory is given back;
    elsewhere ``"peak"``: the largest resident set so far (``getrusage``), which can only grow.
    """
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, "current"
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**20 if sys.platform == "darwin" else 2**10), "peak"


class MomentumSGD:
    """``v = momentum * v + g``; ``w = w - lr * v``: tensor arithmetic, then ``Platform.replace_parameter``.

    Args:
        slots: ``(owner_module, attribute)`` of every trained parameter; looked up afresh each step because
            ``replace_parameter`` installs a new Parameter object.
    """

    def __init__(self, slots: list[tuple], lr: float, momentum: float):
        self.slots, self.lr, self.momentum = slots, lr, momentum
        self.velocity: list = [None] * len(slots)

    def params(self) -> list:
        return [getattr(owner, name) for owner, name in self.slots]

    def step(self, grads) -> None:
        p = get_platform()
        for i, ((owner, name), g) in enumerate(zip(self.slots, grads)):
            v = g if self.velocity[i] is None else self.velocity[i] * self.momentum + g
            self.velocity[i] = v
            p.replace_parameter(owner, name, getattr(owner, name) - v * self.lr)


def _trained_slots(model) -> tuple[list[tuple], list[bool]]:
    """Every trainable parameter as ``(owner, attribute)``, and whether it is replicated (needs its gradient
    summed over the data axis) rather than sharded by an expert-parallel style."""
    p = get_platform()
    modules = dict(p.named_modules(model))
    slots, replicated = [], []
    for name, param in p.named_parameters(model):
        if not param.requires_grad:
            continue
        owner, _, attr = name.rpartition(".")
        slots.append((modules[owner], attr))
        replicated.append(get_parameter_spec(param) is None)
    return slots, replicated


def _parallelize(model, spec: RunSpec):
    """Apply the layout's style to every layer's experts; return ``(data_group, data_rank)``."""
    p = get_platform()
    if spec.nproc == 1:
        return None, 0
    if spec.ep > 1 and spec.tp > 1:
        mesh = init_device_mesh(p.device_type, (spec.ep, spec.tp), mesh_dim_names=("ep", "tp"))
        style, data = ExpertTensorParallel(), mesh["ep"]
    elif spec.ep > 1:
        mesh = init_device_mesh(p.device_type, (spec.ep,), mesh_dim_names=("ep",))
        style, data = ExpertParallel(), mesh
    else:
        mesh = init_device_mesh(p.device_type, (spec.tp,), mesh_dim_names=("tp",))
        style, data = TensorParallel(), None
    for layer in model.moe_layers():
        style.apply(layer.experts, mesh)  # one style object serves every layer
    if data is None:
        return None, 0
    return data.get_group(), data.get_local_rank()


def train(spec: RunSpec, emit=print) -> list[dict]:
    """Run ``spec`` on this rank; return (and, on rank 0, ``emit``) one record per step."""
    p = get_platform()
    cfg = spec.model
    if spec.nproc > 1:
        p.init_process_group()
    p.manual_seed(cfg.seed)
    rank = p.get_rank() if spec.nproc > 1 else 0
    model = build_model(cfg)
    data_group, data_rank = _parallelize(model, spec)
    slots, replicated = _trained_slots(model)
    opt = MomentumSGD(slots, cfg.lr, cfg.momentum)
    task = TeacherTask(dim=cfg.dim, experts=cfg.experts, hidden=cfg.teacher_hidden, tokens=cfg.tokens,
                       seed=cfg.seed)
    layers = model.moe_layers()
    scale = 1.0 / (cfg.tokens * cfg.dim)
    records = []
    if rank == 0:
        emit(RECORD_PREFIX + json.dumps({"event": "start", "params": _count_params(model, replicated, spec)}))
    for step in range(spec.steps):
        t0 = time.perf_counter()
        x_np, y_np = task.batch(step, data_rank, spec.data_parallel)
        x, y = p.tensor(x_np), p.tensor(y_np)

        def loss_fn():
            d = model(x) - y
            return (d * d).sum() * scale

        loss, _, grads = p.value_and_grad(loss_fn, [], opt.params())
        grads = list(grads)
        loads = p.cat([layer.tokens_per_expert for layer in layers])
        # one all_reduce over the data axis: replicated gradients, the loss and the loads, flattened together
        parts = [g.reshape(-1) for g, rep in zip(grads, replicated) if rep] + [loss.reshape(1), loads]
        flat = p.cat(parts)
        if data_group is not None:
            flat = p.all_reduce(flat, "sum", group=data_group)
        offset = 0
        for i, rep in enumerate(replicated):
            if rep:
                n = _numel(grads[i])
                grads[i] = flat[offset:offset + n].reshape(tuple(grads[i].shape))
                offset += n
        loss_g, loads_g = flat[offset:offset + 1], flat[offset + 1:]
        opt.step(grads)
        E = cfg.experts
        for i, layer in enumerate(layers):
            new_bias = update_expert_bias(layer.expert_bias, loads_g[i * E:(i + 1) * E], cfg.bias_update_rate)
            p.replace_parameter(layer, "expert_bias", new_bias)
            layer.tokens_per_expert = p.zeros((E,))
        host = p.tolist(p.cat([loss_g, loads_g]))  # the step's one host sync (besides dispatch's)
        record = {"event": "step", "step": step, "loss": host[0], "time_s": time.perf_counter() - t0,
                  "load": [int(round(v)) for v in host[1:]]}
        records.append(record)
        if rank == 0:
            emit(RECORD_PREFIX + json.dumps(record))
        if step + 1 in spec.memory_steps:  # every rank: the soak compares them
            mib, kind = resident_mib()
            emit(RECORD_PREFIX + json.dumps({"event": "memory", "step": step + 1, "rank": rank, "rss_mib": mib,
                                             "kind": kind}))
    return records


def _numel(t) -> int:
    n = 1
    for s in t.shape:
        n *= int(s)
    return n


def _count_params(model, replicated, spec: RunSpec) -> dict:
    """Parameters held by this rank, and in the whole model (sharded expert weights counted once)."""
    p = get_platform()
    local = [_numel(q) for _, q in p.named_parameters(model) if q.requires_grad]
    total = sum(n if rep else n * spec.nproc for n, rep in zip(local, replicated))
    return {"per_rank": sum(local), "model": total}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = RunSpec.from_json(argv[0])
    train(spec, emit=lambda line: print(line, flush=True))
    p = get_platform()
    if p.is_initialized():
        p.barrier()  # no rank leaves while another may still talk to it
    return 0


if __name__ == "__main__":
    sys.exit(main())
