"""Helpers of benchmarks/bench_http.py: the config table, the in-process driver, uvicorn + wrk, Redis counters."""
