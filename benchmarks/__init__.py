"""shmkit's benchmarks: ``python -m benchmarks --help``; how to add one: README.md.

Each ``bench_<topic>.py`` module holds the workloads of one topic, declared with
:func:`benchmarks.harness.workload`; ``python -m benchmarks`` finds and runs them.
"""
