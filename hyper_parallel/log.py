"""The library's logger: ``logging.getLogger("hyper_parallel")``, silent unless asked, one prefix per rank.

Every module logs to a child of ``hyper_parallel`` (``hyper_parallel.expert_parallel.dispatch`` ...). Nothing is
printed by default (a ``NullHandler``, as libraries should). Turn it on with the environment variable
``HYPER_PARALLEL_LOG_LEVEL`` (``debug``, ``info``, ``warning``, ``error``; read at ``import hyper_parallel``, so it
reaches every rank a launcher starts), with ``hyper-parallel --log-level`` on the command line, or from code with
:func:`configure_logging`. Lines read ``[rank 1] DEBUG hyper_parallel.expert_parallel.dispatch: ...``; the rank is
the world rank once the process has joined a world, the launcher's ``RANK`` before that.

What is logged: joining the world and creating groups (``info`` / ``debug``), styles applied to modules (``info``),
each dispatch's split sizes (``debug``), fallbacks to a slower kernel (``warning``).

>>> import hyper_parallel.log
>>> hyper_parallel.log.configure_logging("debug")      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["ENV_VAR", "LEVELS", "configure_logging", "logger"]

#: The environment variable read at import.
ENV_VAR = "HYPER_PARALLEL_LOG_LEVEL"
#: Accepted level names (case-insensitive).
LEVELS = ("debug", "info", "warning", "error", "critical")

logger = logging.getLogger("hyper_parallel")
logger.addHandler(logging.NullHandler())
_HANDLER_NAME = "hyper_parallel.rank_handler"


class _RankFilter(logging.Filter):
    """Adds ``record.rank``: the world rank if this process joined a world, else the launcher's ``RANK``."""

    def filter(self, record: logging.LogRecord) -> bool:
        from hyper_parallel import _select  # here, not at import: _select is light, but keep the edge one-way

        platform = _select._cached
        if platform is not None and platform.is_initialized():
            record.rank = platform.get_rank()
        else:
            record.rank = os.environ.get("RANK", "-")
        return True


def configure_logging(level: str | int | None = None, stream: TextIO | None = None) -> None:
    """Print the library's log records at ``level`` and above to ``stream`` (default stderr), prefixed by rank.

    Args:
        level: a name in :data:`LEVELS`, a ``logging`` level number, or ``None`` to read :data:`ENV_VAR` (unset or
            empty: leave the logger as it is).
        stream: where the lines go.

    Raises:
        ValueError: an unknown level name (the message lists the valid ones).
    """
    if level is None:
        level = os.environ.get(ENV_VAR, "").strip()
        if not level:
            return
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {list(LEVELS)} (or {ENV_VAR} set to one), got {level!r}")
        level = getattr(logging, level.upper())
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_RankFilter())
    # under hyper_parallel.launch every line of a rank's stderr already starts with [rank r]
    prefixed = stream is None and os.environ.get("HYPER_PARALLEL_OUTPUT_PREFIXED") == "1"
    fmt = "%(levelname)s %(name)s: %(message)s" if prefixed else "[rank %(rank)s] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level)
