"""The problems the suite fits: exact (conjugate) problems and logistic regression.

Exact problems come from ``vi_engine.exact``; logistic regression (no closed form) is written
here, as a plain log density with its data passed explicitly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Problem:
    """What every method needs: a log density on R^dim, and (for exact problems) p* and log p(D).

    ``log_density(z, *data)`` is the unnormalized log posterior; ``data`` is passed explicitly
    so jitted baselines take it as an argument rather than baking it in as a constant.
    """

    name: str
    dim: int
    log_density: Callable
    data: tuple = ()
    posterior: Any = None  # numpyro Distribution over R^dim, or None
    log_evidence: float | None = None
    target: Any = None  # vi_engine Target
    source: str = ""
    settings: dict = dataclasses.field(default_factory=dict)
    build_seconds: float | None = None  # closed-form posterior's own time (first call)
    rebuild: Callable | None = None  # builds the exact problem again (steady-state timing)

    def logp(self, z):
        return self.log_density(z, *self.data)


def _target(log_density, dim, data):
    import vi_engine as vi

    return vi.Target.from_log_density(log_density, dim, data=data)


def _timed(build):
    """``(ExactProblem, seconds)``: the closed-form posterior's own time (first call)."""
    t0 = time.perf_counter()
    ep = build()
    jax.block_until_ready((jax.tree_util.tree_leaves(vars(ep.posterior)), ep.log_evidence))
    return ep, time.perf_counter() - t0


def from_exact(name: str, build: Callable, settings=None) -> Problem:
    """Wrap a ``vi_engine.exact`` problem built by ``build()``; baselines call its target's
    ``log_density`` (data closed over, as a user of those libraries would write it)."""
    ep, seconds = _timed(build)
    target = ep.target
    return Problem(
        name=name,
        dim=int(target.dim),
        log_density=lambda z: target.log_density(z),
        data=(),
        posterior=ep.posterior,
        log_evidence=float(ep.log_evidence),
        target=target,
        source=f"vi_engine.exact.{ep.name}",
        settings=settings or {},
        build_seconds=seconds,
        rebuild=build,
    )


def linear_regression(seed=0, n=500, d=20, prior_scale=1.0, noise_scale=1.0) -> Problem:
    """Bayesian linear regression, prior N(0, prior_scale² I), noise σ: the issue-5 problem."""
    from vi_engine import exact

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = rng.standard_normal(d)
    y = jnp.asarray(np.asarray(x) @ w + noise_scale * rng.standard_normal(n), jnp.float32)
    return from_exact(
        f"linreg_n{n}_d{d}",
        lambda: exact.linear_regression(x, y, prior_scale, noise_scale),
        {"n": n, "d": d, "prior_scale": prior_scale, "noise_scale": noise_scale, "seed": seed},
    )


def correlated_gaussian(rho=0.9) -> Problem:
    """2-D Gaussian with correlation ``rho``: mean-field variances must be 1/Λ_ii."""
    from vi_engine import exact

    mean = jnp.asarray([0.5, -1.0], jnp.float32)
    cov = jnp.asarray([[1.0, rho], [rho, 1.0]], jnp.float32)
    return from_exact(f"gauss2d_rho{rho}", lambda: exact.gaussian(mean, cov),
                      {"rho": rho, "mean": [0.5, -1.0]})


def generated(name: str, seed: int = 0) -> Problem:
    """One of ``vi_engine.exact.make_<name>(key)`` at its default (small) size."""
    from vi_engine import exact

    maker = getattr(exact, f"make_{name}")
    key = jax.random.key(seed)
    return from_exact(name, lambda: maker(key), {"maker": f"exact.make_{name}", "seed": seed})


def logistic_data(seed: int, n: int, d: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    y = (rng.uniform(size=n) < p).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def logistic_log_density(z, x, y):
    """Logistic regression, prior N(0, I): log p(y | X, z) + log p(z), up to a constant."""
    logits = x @ z
    return jnp.sum(y * logits - jnp.logaddexp(0.0, logits)) - 0.5 * jnp.sum(z**2)


def logistic_regression(seed=0, n=100, d=5) -> Problem:
    x, y = logistic_data(seed, n, d)
    return Problem(
        name=f"logreg_n{n}_d{d}",
        dim=d,
        log_density=logistic_log_density,
        data=(x, y),
        target=_target(logistic_log_density, d, (x, y)),
        source="benchmarks.problems.logistic_regression",
        settings={"n": n, "d": d, "seed": seed},
    )
