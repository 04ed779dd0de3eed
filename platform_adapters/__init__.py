"""One adapter per framework, each a :class:`hyper_parallel.platform.Platform` subclass of the same shape.

Modules here import their framework at import time; :func:`hyper_parallel.get_platform` imports only the one chosen.
"""
