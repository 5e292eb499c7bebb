"""moetx benchmarks, run from the repository root as `python -m benchmarks.NAME` (they use `tests.bodies`)."""
