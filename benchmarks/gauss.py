"""Judging a fit: KL(q‖p*) against the exact posterior, in float64 NumPy.

Kept independent of ``vi_engine.kl`` on purpose: the suite judges the engine with its own code.
Gaussian q against Gaussian p* is closed form; anything else is Monte Carlo with a standard error.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import numpyro.distributions as dist


def gaussian_moments(d) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean (dim,), cov (dim, dim))`` in float64 if ``d`` is a Gaussian with event shape
    ``(dim,)`` and no batch shape; ``None`` otherwise."""
    if isinstance(d, dist.Independent) and isinstance(d.base_dist, dist.Normal):
        if d.reinterpreted_batch_ndims != 1:
            return None
        loc = np.asarray(d.base_dist.loc, np.float64)
        scale = np.broadcast_to(np.asarray(d.base_dist.scale, np.float64), loc.shape)
        return loc, np.diag(scale**2)
    if isinstance(d, dist.LowRankMultivariateNormal):
        w = np.asarray(d.cov_factor, np.float64)
        return np.asarray(d.loc, np.float64), w @ w.T + np.diag(np.asarray(d.cov_diag, np.float64))
    if isinstance(d, dist.MultivariateNormal):
        lo = np.asarray(d.scale_tril, np.float64)
        loc = np.broadcast_to(np.asarray(d.loc, np.float64), lo.shape[:-1])
        return loc, lo @ lo.T
    return None


def kl_gauss(m0, s0, m1, s1) -> float:
    """KL(N(m0, s0) ‖ N(m1, s1)) in nats, float64, via Cholesky solves."""
    m0, s0, m1, s1 = (np.asarray(a, np.float64) for a in (m0, s0, m1, s1))
    k = m0.shape[-1]
    l1 = np.linalg.cholesky(s1)
    try:
        l0 = np.linalg.cholesky(s0)
    except np.linalg.LinAlgError:
        return math.inf
    a = np.linalg.solve(l1, l0)  # L1^-1 L0
    diff = np.linalg.solve(l1, m1 - m0)
    logdet = 2.0 * (np.log(np.diag(l1)).sum() - np.log(np.diag(l0)).sum())
    return float(0.5 * ((a**2).sum() + diff @ diff - k + logdet))


def meanfield_optimum(mean, cov) -> tuple[np.ndarray, np.ndarray, float]:
    """The best mean-field Gaussian under KL(q‖p) for p = N(mean, cov).

    Exact mean and variances 1/Λ_ii, Λ = cov⁻¹ (Bishop, PRML §10.1.2). Returns
    ``(mean, variances, KL(q_opt‖p))``: that KL is the floor no mean-field fit can go below.
    """
    cov = np.asarray(cov, np.float64)
    chol = np.linalg.cholesky(cov)
    eye = np.eye(cov.shape[0])
    linv = np.linalg.solve(chol, eye)
    prec_diag = (linv**2).sum(0)  # diag(L^-T L^-1)
    var = 1.0 / prec_diag
    return np.asarray(mean, np.float64), var, kl_gauss(mean, np.diag(var), mean, cov)


def kl_to_exact(q, posterior, key=None, num_samples: int = 4096) -> tuple[float, float]:
    """``(KL(q‖p*), stderr)``: closed form (stderr 0) when both are Gaussian, else Monte Carlo."""
    mq, mp = gaussian_moments(q), gaussian_moments(posterior)
    if mq is not None and mp is not None:
        if not (np.all(np.isfinite(mq[0])) and np.all(np.isfinite(mq[1]))):
            return math.inf, 0.0
        return kl_gauss(mq[0], mq[1], mp[0], mp[1]), 0.0
    key = jax.random.PRNGKey(0) if key is None else key
    z = q.sample(key, (num_samples,))
    r = np.asarray(q.log_prob(z), np.float64) - np.asarray(posterior.log_prob(z), np.float64)
    if not np.all(np.isfinite(r)):
        return math.inf, 0.0
    return float(r.mean()), float(r.std(ddof=1) / math.sqrt(num_samples))
