"""Benchmarks of a running Coordinator (`make bench ARGS=…`, `python -m bench --help`).

The harness only speaks the public HTTP API (plus, optionally, Postgres to seed a large delegation
graph and Temporal visibility to see workflows settle), so the same scenarios run against any
implementation of the API. See bench/README.md.
"""

__all__ = ["SCENARIOS", "run_bench"]


def __getattr__(name: str):  # lazy: `python -m bench --help` should not import the HTTP client & co.
    if name == "run_bench":
        from bench.runner import run_bench

        return run_bench
    if name == "SCENARIOS":
        from bench.scenarios import SCENARIOS

        return SCENARIOS
    raise AttributeError(name)
