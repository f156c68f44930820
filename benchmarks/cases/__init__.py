"""The cases, in the order they run. Each module has ``NAME`` and ``run(settings, ctx) -> dict``
returning ``{"name", "table": {"title", "columns", "rows"}, "checks": [...], "data": {...}}``."""

from benchmarks.cases import accuracy, fit_many, flows, kl, posteriordb, throughput

CASES = {m.NAME: m for m in (accuracy, throughput, fit_many, kl, flows, posteriordb)}

__all__ = ["CASES"]
