"""Entry point of one rank of a :class:`~hyper_parallel.testing.World`: ``python -m hyper_parallel.testing._worker``.

Joins the process group once, connects back to the parent, then runs ``(fn, args, kwargs)`` messages until it
receives ``None``. Every case's result (or traceback) is sent back; the process group outlives the cases.
"""

from __future__ import annotations

import importlib
import multiprocessing.connection as mpc
import os
import sys
import traceback


def _platform():
    import hyper_parallel._select as select

    spec = os.environ.get("HYPER_PARALLEL_WORKER_PLATFORM_CLASS")
    if spec:  # an adapter's logic run on another device, e.g. the NPU adapter on CPU/gloo
        module, cls = spec.split(":")
        select._reset_platform_for_tests(getattr(importlib.import_module(module), cls)())
    return select.get_platform()


def main() -> int:
    host, port = os.environ["HYPER_PARALLEL_WORKER_ADDRESS"].rsplit(":", 1)
    platform = _platform()
    platform.init_process_group()
    conn = mpc.Client((host, int(port)), authkey=bytes.fromhex(os.environ["HYPER_PARALLEL_WORKER_AUTHKEY"]))
    conn.send(platform.get_rank())
    conn.send(("ready", platform.name))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            break
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            reply = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent, with its traceback
            reply = ("err", traceback.format_exc())
        conn.send(reply)
    # Leave together: rank 0 may host the rendezvous store the others still talk to.
    platform.barrier()
    conn.close()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
