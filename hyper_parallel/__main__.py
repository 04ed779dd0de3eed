"""``python -m hyper_parallel ...`` is the ``hyper-parallel`` command."""

import sys

from hyper_parallel.cli import main

sys.exit(main())
