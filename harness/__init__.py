"""The test-and-benchmark harness: the real TorchServe on free loopback ports, one API helper, the two load
drivers (correctness under load; throughput with wrk) and the in-process handler Context. Used by tests/ and
benchmarks/; imports neither."""
