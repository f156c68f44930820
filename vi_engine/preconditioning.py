"""The Laplace approximation, and preconditioning a fit with it.

``laplace(target)`` finds the mode of ``log p̃`` with optax's L-BFGS (zoom line search), all in
one compiled ``lax.while_loop``, and takes the Hessian there: ``N(mode, H⁻¹)`` with
``H = -∇² log p̃(mode)``.

Why a fit needs it. Adam takes steps of about its learning rate in every coordinate, so its
learning rate assumes a posterior of roughly unit scale with no strong correlations. Real
posteriors can be far from that. Measured on posteriordb (``benchmarks/posteriordb.py``,
full-rank, the defaults):

- kidiq (raw predictors, correlations down to -0.99): posterior means 2.5-2.7 reference sds
  off, some sds at 0.14-0.29 of the reference;
- kilpisjarvi (corr(alpha, beta) = -0.99999, sds 30 and 0.0075): means 1.9-2.0 sds off, the
  ridge's sds at 0.00 of the reference;

both reported ``converged``, in float32 and float64 alike, and 50,000 Adam steps (learning rate
0.01, cosine decay) did not fix either: first-order stochastic optimization does not cross such
ridges in any sensible time. ``vi.fit(..., precondition="laplace")`` fits in the whitened
coordinates ``w = L⁻¹(z - mode)`` (``L Lᵀ = H⁻¹``), where that posterior is close to ``N(0, I)``,
starting from the Laplace approximation itself; the result is mapped back (a Gaussian family
stays the same family over ``z``).

The whitening must keep the family's structure: the full Cholesky factor for ``FullRank``; for
``MeanField`` and ``LowRank`` a diagonal one (``1/√H_ii``, the mean-field optimum's scale on a
Gaussian), with the mode as the new origin. Other families are not supported yet.

It needs a mode with a positive-definite Hessian: not the case for a hierarchical funnel
(eight schools, centred: the density is unbounded as the population scale goes to 0), where
``laplace`` raises, naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from numpyro.distributions import MultivariateNormal
from numpyro.distributions.util import cholesky_of_inverse

from vi_engine.families import FullRank, LowRank, MeanField
from vi_engine.families.gaussian import FullRankParams, LowRankParams, MeanFieldParams
from vi_engine.targets import Target


class Laplace(NamedTuple):
    """What ``vi.laplace`` returns.

    Attributes:
      mode: ``(dim,)`` the maximizer of ``log p̃`` found.
      scale_tril: ``(dim, dim)`` lower Cholesky factor of ``H⁻¹``, ``H = -∇² log p̃(mode)``.
      precision: ``(dim, dim)`` ``H``.
      log_density: ``log p̃(mode)``.
      grad_norm: ``max |∇ log p̃(mode)|``.
      num_iters: L-BFGS iterations run.
      converged: the gradient met its tolerance (not only stalled, or ran out of iterations).
        In float32 a badly conditioned mode (kilpisjarvi) often stalls short of it: the
        Hessian there still whitens well enough for a full-rank fit (measured), but use
        float64 (``jax_enable_x64``) where the mode itself matters.
    """

    mode: jax.Array
    scale_tril: jax.Array
    precision: jax.Array
    log_density: jax.Array
    grad_norm: jax.Array
    num_iters: int
    converged: bool

    @property
    def posterior(self) -> MultivariateNormal:
        """``N(mode, H⁻¹)`` as a numpyro ``MultivariateNormal``."""
        return MultivariateNormal(self.mode, scale_tril=self.scale_tril)


def _mode_and_hessian(target, z0, max_iters, gtol, ftol):
    def neg(z):
        return -target.log_density(z)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(neg)

    def step(carry):
        z, state, prev, stalls = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=neg)
        # A run of iterations that barely change the objective: at the dtype's resolution (a
        # single one happens on the way, so one is not enough to stop).
        stalled = jnp.abs(prev - value) <= ftol * jnp.maximum(1.0, jnp.abs(value))
        stalls = jnp.where(stalled, stalls + 1, 0)
        return optax.apply_updates(z, updates), state, value, stalls

    def keep_going(carry):
        _, state, value, stalls = carry
        count = otu.tree_get(state, "count")
        grad = otu.tree_get(state, "grad")
        small_grad = jnp.max(jnp.abs(grad)) <= gtol * jnp.maximum(1.0, jnp.abs(value))
        return (count == 0) | (
            (count < max_iters) & ~small_grad & (stalls < _STALLS) & jnp.isfinite(value)
        )

    inf = jnp.asarray(jnp.inf, z0.dtype)
    z, state, _, _ = jax.lax.while_loop(
        keep_going, step, (z0, opt.init(z0), inf, jnp.zeros((), jnp.int32))
    )
    value, grad = jax.value_and_grad(neg)(z)
    hessian = jax.hessian(neg)(z)
    hessian = 0.5 * (hessian + hessian.T)  # exact symmetry for the Cholesky
    scale_tril = cholesky_of_inverse(hessian)
    return z, scale_tril, hessian, -value, jnp.max(jnp.abs(grad)), otu.tree_get(state, "count")


_STALLS = 10
_compiled = jax.jit(_mode_and_hessian, static_argnums=(2,))


def laplace(target: Target, *, init=None, max_iters: int = 1000, gtol: float | None = None,
            ftol: float | None = None) -> Laplace:
    """The Laplace approximation ``N(mode, H⁻¹)`` of ``target``'s posterior.

    Args:
      target: a ``vi.Target`` over R^dim.
      init: ``(dim,)`` starting point of the mode search (default zeros).
      max_iters: L-BFGS iterations at most.
      gtol, ftol: stop when ``max|∇ log p̃| <= gtol · max(1, |log p̃|)`` or when an iteration
        changes ``log p̃`` by at most ``ftol · max(1, |log p̃|)``, 10 times in a row; defaults
        ``√eps`` and ``10 eps`` of the dtype.

    Raises:
      ValueError: ``init`` has the wrong shape; the search ended at a non-finite value; or the
        Hessian there is not positive definite (no proper mode: an unbounded density such as a
        hierarchical funnel, or a saddle).

    >>> import jax.numpy as jnp, vi_engine as vi
    >>> t = vi.Target.from_log_density(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / 4.0), 2)
    >>> lap = vi.laplace(t)
    >>> [round(float(v), 3) for v in lap.mode], [round(float(v), 3) for v in lap.scale_tril[0]]
    ([1.0, 1.0], [2.0, 0.0])
    """
    if not isinstance(target, Target):
        raise TypeError(f"target: expected a vi.Target, got {type(target).__name__}")
    if not (isinstance(max_iters, (int, np.integer)) and max_iters >= 1):
        raise ValueError(f"max_iters: expected a positive integer, got {max_iters!r}")
    dtype = jnp.result_type(float)
    eps = float(jnp.finfo(dtype).eps)
    gtol = math.sqrt(eps) if gtol is None else float(gtol)
    ftol = 10 * eps if ftol is None else float(ftol)
    if init is None:
        z0 = jnp.zeros((target.dim,), dtype)
    else:
        z0 = jnp.asarray(init, dtype)
        if z0.shape != (target.dim,):
            raise ValueError(f"init: expected shape ({target.dim},), got {z0.shape}")
    mode, scale_tril, precision, value, grad_norm, count = _compiled(
        target, z0, int(max_iters), jnp.asarray(gtol, dtype), jnp.asarray(ftol, dtype)
    )
    if not (bool(jnp.all(jnp.isfinite(mode))) and bool(jnp.isfinite(value))):
        raise ValueError(
            f"vi.laplace: the mode search of target {target.name!r} ended at a non-finite log "
            f"density after {int(count)} iterations; try another init or check the model."
        )
    if not bool(jnp.all(jnp.isfinite(scale_tril))):
        eig = np.linalg.eigvalsh(np.asarray(precision, np.float64))
        raise ValueError(
            f"vi.laplace: the Hessian of -log p̃ at the point found for target {target.name!r} "
            f"is not positive definite (smallest eigenvalue {eig[0]:.3g}): no proper mode there "
            "(an unbounded density such as a hierarchical funnel, or a saddle). Fit without "
            "precondition, or reparameterize (e.g. non-centred)."
        )
    converged = float(grad_norm) <= gtol * max(1.0, abs(float(value)))
    return Laplace(mode, scale_tril, precision, value, grad_norm, int(count), converged)


# --- preconditioned fits ----------------------------------------------------------------------


def _whitened_log_density(w, mode, lo, inner):
    """``log p̃(mode + lo w) + log|det lo|``: a density over ``w`` with the same normalizer, so
    ELBOs (and log-evidence bounds) are those of the original target."""
    if lo.ndim == 2:
        z = mode + lo @ w
        logdet = jnp.sum(jnp.log(jnp.diagonal(lo)))
    else:
        z = mode + lo * w
        logdet = jnp.sum(jnp.log(lo))
    return inner.log_density(z) + logdet


def check_family(family):
    """Raise unless ``family`` can be fitted preconditioned (see ``whitening``)."""
    if not isinstance(family, (FullRank, MeanField, LowRank)):
        raise ValueError(
            f"precondition: supported for the 'fullrank', 'meanfield' and 'lowrank' families, "
            f"not {family.name!r} ({type(family).__name__})."
        )


def whitening(family, lap: Laplace):
    """The linear map of ``family``'s preconditioned fit: the full ``scale_tril`` for
    ``FullRank``; for ``MeanField`` and ``LowRank`` the diagonal ``1/√H_ii``."""
    check_family(family)
    if isinstance(family, FullRank):
        return lap.scale_tril
    return 1.0 / jnp.sqrt(jnp.diagonal(lap.precision))


def whitened_target(target: Target, mode, lo) -> Target:
    """``target`` in the coordinates ``w`` with ``z = mode + lo w`` (``lo``: ``(dim, dim)``
    lower triangular or ``(dim,)`` diagonal)."""
    return Target.from_log_density(
        _whitened_log_density, target.dim, data=(mode, lo, target),
        name=f"{target.name} (whitened)",
    )


@functools.partial(jax.jit, static_argnums=(0, 4))
def _map_params(family, params, mode, lo, to_z):
    """Family parameters over ``w`` mapped to those over ``z = mode + lo w`` (``to_z``), or
    back. Each family keeps its structure: see ``whitening``."""
    if isinstance(family, FullRank):
        lw = family.scale_tril(params)
        if to_z:
            loc, lz = mode + lo @ params.loc, lo @ lw
        else:
            solve = functools.partial(jax.scipy.linalg.solve_triangular, lo, lower=True)
            loc, lz = solve(params.loc - mode), solve(lw)
        d = jnp.diagonal(lz)
        off = jnp.tril(lz / d[None, :], -1)
        return FullRankParams(loc, jnp.log(d), off)
    sign = 1.0 if to_z else -1.0
    log_lo = jnp.log(lo)
    loc = mode + lo * params.loc if to_z else (params.loc - mode) / lo
    if isinstance(family, MeanField):
        return MeanFieldParams(loc, params.log_scale + sign * log_lo)
    factor = params.cov_factor * (lo if to_z else 1.0 / lo)[:, None]
    return LowRankParams(loc, factor, params.log_diag + sign * log_lo)


def start_family(family):
    """``family`` as started from the Laplace approximation in whitened coordinates: unit
    initial scale (``FullRank`` then starts at ``N(mode, H⁻¹)`` exactly)."""
    return dataclasses.replace(family, init_scale=1.0)


def to_z(family, params, mode, lo) -> Any:
    return _map_params(family, params, mode, lo, True)


def to_w(family, params, mode, lo) -> Any:
    return _map_params(family, params, mode, lo, False)
