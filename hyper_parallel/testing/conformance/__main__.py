"""``python -m hyper_parallel.testing.conformance --backend NAME [--nproc 2 4] [--timeout S]``."""

import sys

from hyper_parallel.testing.conformance.runner import main

if __name__ == "__main__":
    sys.exit(main())
