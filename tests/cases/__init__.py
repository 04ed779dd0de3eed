"""Case functions executed on every rank of a test world (see hyper_parallel.testing.World.run)."""
