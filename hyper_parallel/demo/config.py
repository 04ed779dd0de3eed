"""The demo's options, how ``--nproc``, ``--dp``, ``--ep`` and ``--tp`` become a layout, and every check on them.

Nothing here imports a framework: the checks run before any process is started, so bad input costs nothing and
leaves nothing behind.

The processes form a ``dp x ep x tp`` grid (``dp * ep * tp = nproc``). The ``dp`` and ``ep`` axes are data axes:
each of their ranks trains on its own equal shard of the global batch (expert parallelism runs inside data
parallelism, its ranks holding different tokens too, as in torchtitan and Megatron-Core), while the ranks of one
``tp`` line hold the same tokens. :class:`~hyper_parallel.DataParallel` over ``("dp", "ep")`` makes every gradient
that of the global batch.

| given | layout |
|---|---|
| nothing | even ``nproc >= 4``: ``dp = 2``, ``ep = nproc / 2`` (4 processes: dp 2 x EP 2); else ``ep = nproc`` |
| some of ``--dp``, ``--ep``, ``--tp`` | an unset ``dp`` or ``tp`` is 1, an unset ``ep`` takes the rest |
| all three | ``dp * ep * tp`` must equal ``nproc`` |

``ep > 1, tp > 1``: :class:`~hyper_parallel.ExpertTensorParallel`; ``tp = 1``: :class:`~hyper_parallel.ExpertParallel`;
``ep = 1``: :class:`~hyper_parallel.TensorParallel`; one process: no style.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

from hyper_parallel import _select

#: Backends the demo can compare with ``--compare-backends``, in the order they run.
COMPARE_BACKENDS = ("torch", "mindspore")
#: Largest allowed ``max |loss_parallel - loss_reference|`` over the steps (fp32).
PARITY_ABS_TOL = 1e-5
#: Routing is discrete: when a token's k-th and (k+1)-th choices are this close, float rounding may pick either,
#: and the two runs then train on different routings. Sums taken in another order on another layout make the two
#: runs' parameters drift apart by rounding over the steps (their losses by up to ~6e-8), which moves scores by up to
#: ~1e-6 after a few hundred steps (a MindSpore run split at a 1.4e-6 tie at step 169). The parity check accepts a
#: routing difference only at a step where the single-process run had such a tie (see
#: :func:`hyper_parallel.demo.driver.loss_parity`); a wrong routing shows up at margins far above this.
ROUTING_TIE_TOL = 1e-5
#: Largest allowed per-step ``|loss_torch - loss_mindspore| / |loss_torch|`` under ``--compare-backends``.
CROSS_BACKEND_REL_TOL = 1e-4


class DemoInputError(ValueError):
    """Bad demo input: reported as one line, exit code 2, before anything is launched."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model, the task and the optimizer: everything a rank needs besides its layout."""

    seed: int = 0
    tokens: int = 512          # global batch: tokens per step, over all data-parallel ranks
    dim: int = 32              # model dimension D
    hidden: int = 64           # each routed expert's hidden size H (the shared expert has the same)
    experts: int = 8           # routed experts per layer
    top_k: int = 2
    layers: int = 3
    shared_experts: int = 1
    init_std: float = 0.1
    teacher_hidden: int = 16
    lr: float = 0.01           # AdamW (torch's semantics: bias-corrected moments, decoupled weight decay)
    weight_decay: float = 0.01
    max_norm: float = 1.0      # global-norm gradient clipping over the whole model
    bias_update_rate: float = 1e-3  # DeepSeek-V3 aux-loss-free balancing, per step


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: a backend on a layout (``ep = tp = 1`` on one process is the reference)."""

    backend: str
    nproc: int
    ep: int
    tp: int
    steps: int
    model: ModelConfig
    #: 1-based steps after which EVERY rank reports its resident memory (``@@hpdemo`` records of event
    #: ``"memory"``); empty: none (the demo's own runs). Set by the soak (:mod:`hyper_parallel.bench.soak`).
    memory_steps: tuple[int, ...] = ()
    #: data-parallel replicas of the ``ep x tp`` grid (``dp * ep * tp = nproc``).
    dp: int = 1
    #: a checkpoint directory to save the model, AdamW's state and the step into at the end ("": none).
    save_dir: str = ""
    #: a checkpoint directory to continue from (any layout, either framework; "": start afresh).
    resume_dir: str = ""

    @property
    def style(self) -> str:
        if self.ep > 1 and self.tp > 1:
            return "ExpertTensorParallel"
        if self.ep > 1:
            return "ExpertParallel"
        if self.tp > 1:
            return "TensorParallel"
        return "single process"

    @property
    def layout(self) -> str:
        """Short layout name for tables and legends: ``dp 2 x EP 2``, ``ETP 2x2``, ``EP 4``, ``TP 2``, ``single``."""
        if self.ep > 1 and self.tp > 1:
            grid = f"ETP {self.ep}x{self.tp}"
        elif self.ep > 1:
            grid = f"EP {self.ep}"
        elif self.tp > 1:
            grid = f"TP {self.tp}"
        else:
            grid = "single" if self.dp == 1 else ""
        return grid if self.dp == 1 else f"dp {self.dp}" + (f" x {grid}" if grid else "")

    @property
    def data_parallel(self) -> int:
        """How many distinct shards the global batch is cut into (the ``dp`` and ``ep`` axes)."""
        return self.dp * self.ep

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        d = json.loads(text)
        d["model"] = ModelConfig(**d["model"])
        d["memory_steps"] = tuple(d.get("memory_steps", ()))  # JSON has lists; the spec keeps a tuple
        return cls(**d)


def resolve_layout(nproc: int, ep: int | None, tp: int | None, dp: int | None = None) -> tuple[int, int, int]:
    """``(dp, ep, tp)`` from the options (table in the module docstring).

    Raises:
        DemoInputError: a size is not positive, or the sizes do not form a ``dp x ep x tp = nproc`` grid.
    """
    for flag, value in (("--nproc", nproc), ("--dp", dp), ("--ep", ep), ("--tp", tp)):
        if value is not None and value < 1:
            raise DemoInputError(f"{flag} {value} is not allowed: it must be a positive integer")
    if dp is None and ep is None and tp is None:
        dp = 2 if nproc >= 4 and nproc % 2 == 0 else 1
        return dp, nproc // dp, 1
    dp_, tp_ = dp or 1, tp or 1
    if ep is None:
        if nproc % (dp_ * tp_):
            given = " x ".join(f"--{n} {v}" for n, v in (("dp", dp), ("tp", tp)) if v is not None)
            raise DemoInputError(f"{given} does not divide --nproc {nproc}: the processes form a dp x ep x tp grid, "
                                 f"so {'dp * tp' if dp and tp else 'dp' if dp else 'tp'} must divide nproc")
        return dp_, nproc // (dp_ * tp_), tp_
    if dp is None and tp is None:
        if nproc % ep:
            raise DemoInputError(f"--ep {ep} does not divide --nproc {nproc}: the processes form a dp x ep x tp "
                                 f"grid, so ep must divide nproc")
        return 1, ep, nproc // ep
    if dp_ * ep * tp_ != nproc:
        sizes = " x ".join(f"--{n} {v}" for n, v in (("dp", dp), ("ep", ep), ("tp", tp)) if v is not None)
        raise DemoInputError(f"{sizes} = {dp_ * ep * tp_} processes, but --nproc is {nproc}: the processes form a "
                             f"dp x ep x tp grid, so dp * ep * tp must equal nproc")
    return dp_, ep, tp_


def check_model(model: ModelConfig, ep: int, tp: int, steps: int, dp: int = 1) -> None:
    """Raise :class:`DemoInputError` when the model, the task or the run length does not fit the layout."""
    if steps < 1:
        raise DemoInputError(f"--steps {steps} is not allowed: it must be a positive integer")
    for flag, value in (("--experts", model.experts), ("--layers", model.layers), ("--tokens", model.tokens)):
        if value < 1:
            raise DemoInputError(f"{flag} {value} is not allowed: it must be a positive integer")
    if model.top_k > model.experts:
        raise DemoInputError(f"--experts {model.experts} is too few: each token picks top_k = {model.top_k} "
                             f"experts, so --experts must be >= {model.top_k}")
    if model.experts % ep:
        raise DemoInputError(f"--ep {ep} does not divide the number of experts ({model.experts}, --experts): each "
                             f"expert-parallel rank must own the same number of whole experts")
    if model.hidden % tp:
        raise DemoInputError(f"--tp {tp} does not divide the experts' hidden size ({model.hidden}): each "
                             f"tensor-parallel rank must own an equal slice of every expert")
    if model.tokens % (dp * ep):
        what = f"--ep {ep}" if dp == 1 else f"dp x ep = {dp * ep}"
        raise DemoInputError(f"--tokens {model.tokens} is not divisible by {what}: each data-parallel rank "
                             f"trains on an equal shard of the global batch")


def resolve_backend(flag_value: str | None, environ: dict | None = None) -> str:
    """The backend from ``--backend``, else ``HYPER_PARALLEL_PLATFORM``, else ``torch``; checked to be known and
    installed.

    Raises:
        DemoInputError: unknown name (naming where it came from and the valid names), or its framework missing.
    """
    env = os.environ if environ is None else environ
    if flag_value is not None:
        source, value = "--backend", flag_value
    elif env.get(_select.ENV_VAR, "").strip():
        source, value = _select.ENV_VAR, env[_select.ENV_VAR]
    else:
        source, value = "default", "torch"
    name = value.strip().lower()
    known = sorted(_select.BUILTIN)
    if name not in known:
        # third-party adapters (entry points) are not offered: the demo is only checked on the built-in ones
        raise DemoInputError(f"{source} {value!r} is not a known backend: valid backends are {', '.join(known)}")
    check_installed(name, source)
    return name


def check_installed(name: str, source: str) -> None:
    spec = _select.BUILTIN[name]
    if importlib.util.find_spec(spec.framework) is None:
        raise DemoInputError(f"{source} {name!r} needs the {spec.framework!r} package, which is not installed "
                             f"(fix: {spec.install})")


def check_plotting() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise DemoInputError("the demo draws its plot with matplotlib, which is not installed (fix: pip install "
                             "matplotlib)")
