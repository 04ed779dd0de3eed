"""``python -m hyper_parallel.demo ...`` is ``hyper-parallel demo ...``."""

import sys

from hyper_parallel.demo import main

sys.exit(main())
