"""Benchmarks: stock TorchServe vs this project's handler vs in-process, one load generator (wrk)."""
