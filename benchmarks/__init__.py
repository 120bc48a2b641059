"""Benchmarks: scripts run as modules from the repository root (`python -m benchmarks.NAME`), each printing
a table and writing results/NAME.json; common.py is their shared harness, tiny_pipelines.py the tiny models
of their smoke modes and of the test suite."""
