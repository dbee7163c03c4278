"""Benchmark CLI of triflash (``triflash-bench``): correctness gate, timings against peers, plots."""
