"""Benchmarks: `python -m bench.run` (CPU, vs PyTorch) and `bench/gpu.sh` (one GPU)."""
