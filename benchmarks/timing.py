"""Timing helpers: warm-up, repeat, median; and the machine/software record.

Every ratio in the suite is taken between two medians measured in the same process, one after
the other, so that load from other processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def now() -> float:
    return time.perf_counter()


def block(x: Any) -> Any:
    """Wait for every array in ``x`` (a pytree) to be computed."""
    return jax.block_until_ready(x)


def timed_call(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``, blocking on the result."""
    t0 = now()
    out = block(fn(*args, **kwargs))
    return out, now() - t0


def measure(fn: Callable, *args, repeat: int = 5, warmup: int = 1, **kwargs) -> dict:
    """Time ``fn(*args)`` after ``warmup`` calls; the first call's time is kept as ``first``.

    Returns ``{"first": s, "median": s, "min": s, "times": [...], "repeat": n}``. ``first`` is
    compile + run when ``fn`` is a fresh jitted function.
    """
    first = None
    for _ in range(max(warmup, 0)):
        _, t = timed_call(fn, *args, **kwargs)
        first = t if first is None else first
    times = []
    for _ in range(max(repeat, 1)):
        _, t = timed_call(fn, *args, **kwargs)
        times.append(t)
    if first is None:
        first = times[0]
    return {
        "first": first,
        "median": statistics.median(times),
        "min": min(times),
        "times": times,
        "repeat": len(times),
    }


def log(msg: str) -> None:
    """Progress line on stderr (visible while the suite runs, kept out of the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    """Machine, jax backend and devices, package versions."""
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
        load = list(os.getloadavg())
    except Exception:  # noqa: BLE001
        mem_gb, load = None, None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "vi_engine"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = commit + ("+uncommitted vi_engine changes" if dirty else "")
    except Exception:  # noqa: BLE001
        commit = None
    return {
        "git_commit": commit,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "loadavg_at_start": load,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "versions": {
            name: _version(name)
            for name in (
                "vi_engine",
                "jax",
                "jaxlib",
                "numpyro",
                "optax",
                "flax",
                "blackjax",
                "numpy",
                "scipy",
            )
        },
    }


def measure_many(fns: dict[str, Callable], *, repeat: int = 5, warmup: int = 1,
                 min_seconds: float = 0.0, max_repeat: int = 200) -> dict:
    """Like :func:`measure` for several zero-argument callables, interleaved: each round calls
    every one once (in a rotating order), so load from other processes hits all alike and
    their ratios are fairer than from back-to-back blocks. Returns ``{name: stats}``.

    At least ``repeat`` rounds; more, up to ``max_repeat``, until every callable has run for
    ``min_seconds`` in all. Calls of a few milliseconds need many rounds: on the 2-core machine
    a 6-9 ms call's time is bimodal (5.5-6 ms or 8.5-10 ms, switching from call to call), so
    the median of 9 rounds landed in either mode and a ratio of two such medians swung from
    0.73 to 1.01 between runs.
    """
    names = list(fns)
    first = {}
    for name in names:
        for i in range(max(warmup, 1)):
            _, t = timed_call(fns[name])
            if i == 0:
                first[name] = t
    times = {name: [] for name in names}
    r = 0
    while r < max(repeat, 1) or (
        r < max_repeat and min(sum(ts) for ts in times.values()) < min_seconds
    ):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _, t = timed_call(fns[name])
            times[name].append(t)
        r += 1
    return {
        name: {"first": first[name], "median": statistics.median(ts), "min": min(ts),
               "times": ts, "repeat": len(ts)}
        for name, ts in times.items()
    }


def measure_first_calls(fns: dict[str, Callable], *, rounds: int = 3) -> dict:
    """Compile-inclusive ("first call") times of several zero-argument callables, each taken
    ``rounds`` times from cold: ``jax.clear_caches()`` and ``vi_engine.fit.clear_caches()``
    before every call, so each one traces and compiles again. Rounds are interleaved in a
    rotating order, as in :func:`measure_many`; a single first call per side is at the mercy of
    the machine's load (seen: ±10% on 3 s).
    Returns ``{name: {"median": s, "times": [...]}}``."""
    from vi_engine.fit import clear_caches as clear_vi_engine_caches

    names = list(fns)
    times = {name: [] for name in names}
    for r in range(max(rounds, 1)):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            jax.clear_caches()
            clear_vi_engine_caches()  # its ahead-of-time executables, which jax does not see
            _, t = timed_call(fns[name])
            times[name].append(t)
    return {name: {"median": statistics.median(ts), "times": ts} for name, ts in times.items()}
