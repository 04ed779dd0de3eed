"""``python -m hyper_parallel.bench``: the same as ``hyper-parallel bench``."""

import sys

from hyper_parallel.bench.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through the CLI
    sys.exit(main())
