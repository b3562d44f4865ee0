"""hotstate benchmarks: workloads and their ceilings, runnable as ``python -m benchmarks``."""
