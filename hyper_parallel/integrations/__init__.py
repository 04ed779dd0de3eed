"""Bridges from the framework-neutral core to one framework's own libraries.

Each module here belongs to one framework and may import it (the neutral core never does); a platform adapter
reaches it only from its own methods, so importing :mod:`hyper_parallel` still imports no framework.

* :mod:`hyper_parallel.integrations.torch_dcp`: sharded parameters in ``state_dict`` as torch ``DTensor`` values,
  so ``torch.distributed.checkpoint`` saves and loads them with their true layout.
"""
