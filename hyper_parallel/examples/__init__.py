"""Runnable examples shipped with the package; each checks its own result and exits nonzero on a mismatch.

* :mod:`hyper_parallel.examples.moe_expert_parallel`: the quickstart's MoE layer under ``ExpertParallel``, forward
  and backward, against the unsharded layer::

      python -m hyper_parallel.launch --nproc 2 -m hyper_parallel.examples.moe_expert_parallel
"""
