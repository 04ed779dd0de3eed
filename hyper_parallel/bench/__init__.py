"""CPU benchmarks: ``hyper-parallel bench`` (also ``python -m hyper_parallel.bench``).

Everything is printed as ratios measured in one run, on the same machine, under the same load:

* **permute** (:mod:`~hyper_parallel.bench.permute`): the vectorized index build of
  :func:`~hyper_parallel.expert_parallel.permute.build_permute_indices` against :func:`permute_indices_loop`, a
  per-(expert, rank) loop like the CPU reference of torchtitan's ``generate_permute_indices``; swept over the rows
  received ``T`` and the EP layout ``R x E``, alignment 8.
* **dispatch** (:mod:`~hyper_parallel.bench.dispatch`): ``token_dispatch`` + ``token_combine`` against two raw
  ``all_to_all_single`` calls that move the same rows with the same split sizes, on 2 and 4 local processes, swept
  over the rows each rank routes.
* **torch vs MindSpore** (:mod:`~hyper_parallel.bench.compare`): every backend runs the same cells with the same
  seeded counts, each in its own worker processes; each row reports ``mindspore / torch``.
* **soak** (:mod:`~hyper_parallel.bench.soak`, ``hyper-parallel bench --soak``): the demo's model trained for 200
  steps on 4 processes and on one, per backend, with every process's resident memory sampled at steps 1, 100 and
  200: memory must stay flat and the loss equal the single-process run's.

Every cell checks its warm-up call against its reference before it is timed; the timing plan is in
:mod:`~hyper_parallel.bench.sweep`, the tables in :mod:`~hyper_parallel.bench.report`, the options in
:mod:`~hyper_parallel.bench.cli`.
"""

from hyper_parallel.bench.cli import main
from hyper_parallel.bench.compare import build_report, progress_line, run
from hyper_parallel.bench.permute import permute_indices_loop
from hyper_parallel.bench.report import format_report, iter_ratios
from hyper_parallel.bench.sweep import ALIGN, DEFAULT, HIDDEN, LOCAL_EXPERTS, QUICK, Sweep, counts_for

__all__ = ["Sweep", "QUICK", "DEFAULT", "ALIGN", "HIDDEN", "LOCAL_EXPERTS", "counts_for", "permute_indices_loop",
           "run", "build_report", "progress_line", "format_report", "iter_ratios", "main"]
