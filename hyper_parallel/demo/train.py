"""What every rank of a demo run executes: ``python -m hyper_parallel.demo.train SPEC_JSON``.

Framework-neutral: the model is built from :class:`~hyper_parallel.moe.MoE` layers for the active backend, the
gradients come from ``Platform.value_and_grad``, and the optimizer is AdamW written with tensor arithmetic and
``Platform.replace_parameter`` (the same numbers on both frameworks, so ``--compare-backends`` compares them step by
step; the frameworks' own optimizers are shown on the Training docs page).

One training step on a rank:

1. take this rank's shard of the step's global batch (:class:`~hyper_parallel.demo.task.TeacherTask`): every rank
   of the ``dp`` and ``ep`` axes its own, the ranks of a ``tp`` line the same;
2. ``loss = mean((model(x) - y)^2)`` over this rank's tokens;
3. :func:`~hyper_parallel.reduce_gradients`: :class:`~hyper_parallel.DataParallel` over ``("dp", "ep")`` makes every
   gradient that of the global batch (replicated parameters averaged in one flat all-reduce per bucket, expert
   shards scaled);
4. :func:`~hyper_parallel.clip_grads` by the norm of the whole model's gradient, then AdamW on every parameter; the
   expert bias (DeepSeek-V3 aux-loss-free balancing) moves from the loads summed over the data ranks.

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
    DataParallel,
    ExpertParallel,
    ExpertTensorParallel,
    TensorParallel,
    checkpoint,
    clip_grads,
    get_parameter_spec,
    get_platform,
    init_device_mesh,
    reduce_gradients,
)
from hyper_parallel.demo.config import RunSpec
from hyper_parallel.demo.model import build_model, routing_margin
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


class AdamW:
    """torch's AdamW in tensor arithmetic (bias-corrected moments, decoupled weight decay), written into the
    parameters in place (``Platform.assign``): ``w -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)``.

    The update runs once over all parameters flattened into one vector (torch's multi-tensor form), not per
    parameter: the same elementwise arithmetic, so the same values bit for bit, in a dozen ops instead of a dozen per
    parameter (MindSpore's PyNative ops cost ~0.1-1 ms each on a CPU: 23 ms of a 116 ms demo step went to the
    per-parameter form). Its state still has torch's layout (``param_groups``, ``state[param] = {"exp_avg",
    "exp_avg_sq", "step"}``, ``state_dict`` / ``load_state_dict``; the moments are views of the flat vectors), so
    :mod:`hyper_parallel.checkpoint` saves and reshards it on both frameworks.
    """

    def __init__(self, params: list, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"params": list(params)}]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self._exp_avg = self._exp_avg_sq = None  # flat, in parameter order, once the first step ran
        self._step = 0
        self._state: dict | None = None  # the per-parameter views, built on first use after each change

    def params(self) -> list:
        return self.param_groups[0]["params"]

    def _pieces(self, flat) -> list:
        out, start = [], 0
        for w in self.params():
            n = _numel(w)
            out.append(flat[start:start + n].reshape(tuple(w.shape)))
            start += n
        return out

    @property
    def state(self) -> dict:
        if self._exp_avg is None:
            return {}
        if self._state is None:  # read per parameter by checkpoints: views made once, not once per read
            self._state = {w: {"exp_avg": m, "exp_avg_sq": v, "step": self._step} for w, m, v in
                           zip(self.params(), self._pieces(self._exp_avg), self._pieces(self._exp_avg_sq))}
        return self._state

    def step(self, grads) -> None:
        p = get_platform()
        b1, b2 = self.betas
        params = self.params()
        g = p.cat([gi.reshape(-1) for gi in grads])
        w = p.cat([wi.reshape(-1) for wi in params])
        if self._exp_avg is None:
            self._exp_avg, self._exp_avg_sq = g * 0, g * 0
        self._step += 1
        self._exp_avg = self._exp_avg * b1 + g * (1 - b1)
        self._exp_avg_sq = self._exp_avg_sq * b2 + g * g * (1 - b2)
        c1, c2 = 1 - b1 ** self._step, 1 - b2 ** self._step
        update = (self._exp_avg / c1) / ((self._exp_avg_sq / c2).sqrt() + self.eps) + w * self.weight_decay
        self._state = None
        for wi, new in zip(params, self._pieces(w - update * self.lr)):
            p.assign(wi, new)

    def state_dict(self) -> dict:
        position = {id(w): i for i, w in enumerate(self.params())}
        return {"state": {position[id(w)]: dict(st) for w, st in self.state.items()},
                "param_groups": [{"params": list(range(len(self.params())))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Raises:
            ValueError: some parameters have state and others not, or their steps differ (this optimizer keeps one
                step for all)."""
        p = get_platform()
        params, state = self.params(), sd["state"]
        self._state = None
        if not state:
            self._exp_avg = self._exp_avg_sq = None
            self._step = 0
            return
        missing = [i for i in range(len(params)) if i not in state and str(i) not in state]
        if missing:
            raise ValueError(f"AdamW.load_state_dict: parameters {missing} of {len(params)} have no state; this "
                             "optimizer steps all its parameters together")
        entries = [state[i] if i in state else state[str(i)] for i in range(len(params))]
        steps = set()
        for st in entries:
            step = st["step"]
            steps.add(int(round(float(p.tolist(step.reshape(1))[0]))) if hasattr(step, "shape") else int(step))
        if len(steps) != 1:
            raise ValueError(f"AdamW.load_state_dict: the parameters' steps differ ({sorted(steps)}); this optimizer "
                             "keeps one step for all")
        self._step = steps.pop()
        self._exp_avg = p.cat([st["exp_avg"].reshape(-1) for st in entries])
        self._exp_avg_sq = p.cat([st["exp_avg_sq"].reshape(-1) for st in entries])


def _parallelize(model, spec: RunSpec):
    """Apply the layout's style to every layer's experts and DataParallel to the model; return the rank's data
    shard index."""
    p = get_platform()
    if spec.nproc == 1:
        return 0
    axes = [(n, s) for n, s in (("dp", spec.dp), ("ep", spec.ep), ("tp", spec.tp)) if s > 1]
    mesh = init_device_mesh(p.device_type, tuple(s for _, s in axes), mesh_dim_names=tuple(n for n, _ in axes))
    if spec.ep > 1 and spec.tp > 1:
        style, experts_mesh = ExpertTensorParallel(), mesh["ep", "tp"]
    elif spec.ep > 1:
        style, experts_mesh = ExpertParallel(), mesh["ep"]
    else:
        style, experts_mesh = TensorParallel(), mesh["tp"]
    for layer in model.moe_layers():
        style.apply(layer.experts, experts_mesh)  # one style object serves every layer
    data_axes = tuple(n for n, _ in axes if n != "tp")
    if data_axes:
        DataParallel(data_axes=data_axes).apply(model, mesh)
    dp_rank = mesh.get_local_rank("dp") if spec.dp > 1 else 0
    ep_rank = mesh.get_local_rank("ep") if spec.ep > 1 else 0
    return dp_rank * spec.ep + ep_rank


def train(spec: RunSpec, emit=print) -> list[dict]:
    """Run ``spec`` on this rank; return (and, on rank 0, ``emit``) one record per step."""
    p = get_platform()
    cfg = spec.model
    if spec.nproc > 1:
        p.init_process_group()
    p.manual_seed(cfg.seed)
    rank = p.get_rank() if spec.nproc > 1 else 0
    model = build_model(cfg)
    data_rank = _parallelize(model, spec)
    opt = AdamW([q for _, q in p.named_parameters(model) if q.requires_grad], cfg.lr, cfg.weight_decay)
    start = 0
    if spec.resume_dir:  # the model, AdamW's moments and the step, resharded to this run's layout / framework
        start = int(checkpoint.load(spec.resume_dir, model, opt)["step"])
    task = TeacherTask(dim=cfg.dim, experts=cfg.experts, hidden=cfg.teacher_hidden, tokens=cfg.tokens,
                       seed=cfg.seed)
    layers = model.moe_layers()
    # the single-process run records how close each step came to a routing tie (the parity check reads it)
    model.record_layer_inputs = spec.nproc == 1
    records = []
    if rank == 0:
        emit(RECORD_PREFIX + json.dumps({"event": "start", "params": _count_params(model)}))
    for step in range(start, start + spec.steps):
        t0 = time.perf_counter()
        x_np, y_np = task.batch(step, data_rank, spec.data_parallel)
        x, y = p.tensor(x_np), p.tensor(y_np)

        def loss_fn():
            d = model(x) - y
            return (d * d).mean()  # the mean over this rank's tokens, as DataParallel's contract has it

        params = opt.params()
        loss, _, grads = p.value_and_grad(loss_fn, [], params)
        # before the optimizer moves the router: the gap top-k decided on in this step's forward
        margin = [p.cat([routing_margin(layer, x_l) for layer, x_l in zip(layers, model.layer_inputs)]).min()
                  .reshape(1)] if model.record_layer_inputs else []
        if spec.data_parallel > 1:
            grads = reduce_gradients(model, grads, params)  # every gradient now that of the global batch
        grads, _ = clip_grads(grads, params, cfg.max_norm)
        opt.step(grads)
        loads = p.cat([layer.tokens_per_expert for layer in layers])
        stats = p.cat([loss.reshape(1), loads])
        if spec.nproc > 1:
            # the mean loss over the data ranks and their summed loads (a tp line's ranks hold the same tokens)
            stats = p.all_reduce(stats, "sum") / spec.tp
            stats = p.cat([stats[:1] / spec.data_parallel, stats[1:]])
        loss_g, loads_g = stats[:1], stats[1:]
        E = cfg.experts
        for i, layer in enumerate(layers):
            new_bias = update_expert_bias(layer.expert_bias, loads_g[i * E:(i + 1) * E], cfg.bias_update_rate)
            p.assign(layer.expert_bias, new_bias)
            p.assign(layer.tokens_per_expert, p.zeros((E,)))
        host = p.tolist(p.cat([loss_g, loads_g, *margin]))  # the step's one host sync (besides dispatch's)
        record = {"event": "step", "step": step, "loss": host[0], "time_s": time.perf_counter() - t0,
                  "load": [int(round(v)) for v in host[1:1 + len(loads_g)]]}
        if margin:
            record["routing_margin"] = host[-1]
        records.append(record)
        if rank == 0:
            emit(RECORD_PREFIX + json.dumps(record))
        if step - start + 1 in spec.memory_steps:  # every rank: the soak compares them
            mib, kind = resident_mib()
            emit(RECORD_PREFIX + json.dumps({"event": "memory", "step": step + 1, "rank": rank, "rss_mib": mib,
                                             "kind": kind}))
    if spec.save_dir:
        checkpoint.save(spec.save_dir, model, opt, extra={"step": start + spec.steps})
    return records


def _numel(t) -> int:
    n = 1
    for s in t.shape:
        n *= int(s)
    return n


def _count_params(model) -> dict:
    """Parameters held by this rank, and in the whole model (a sharded parameter counted once, at its global
    shape: it is split over the expert ranks only, and repeated along the data axes)."""
    p = get_platform()
    trained = [q for _, q in p.named_parameters(model) if q.requires_grad]
    specs = [get_parameter_spec(q) for q in trained]
    return {"per_rank": sum(_numel(q) for q in trained),
            "model": sum(_numel(q) if spec is None else _numel(spec) for q, spec in zip(trained, specs))}


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
