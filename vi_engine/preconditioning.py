"""The Laplace approximation, and preconditioning a fit with it.

``laplace(target)`` finds the mode of ``log p̃`` with optax's L-BFGS (zoom line search) and then
Newton steps with the exact Hessian (affine invariant: they cross a ridge that L-BFGS crawls
along), all in one compiled program, and takes the Hessian there: ``N(mode, H⁻¹)`` with
``H = -∇² log p̃(mode)``. It is done when the Newton decrement (what another Newton step would
gain, in nats) is below a tolerance: a test that neither the parameters' scales nor an
additive constant in ``log p̃`` can fool.

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
``laplace`` raises, naming the problem (the search ran off, ended at a non-finite value, or at
an indefinite Hessian).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from numpyro.distributions import MultivariateNormal
from numpyro.distributions.util import cholesky_of_inverse

from vi_engine import _compile
from vi_engine._checks import positive_int
from vi_engine.families import FullRank, LowRank, MeanField
from vi_engine.families.gaussian import FullRankParams, LowRankParams, MeanFieldParams
from vi_engine.targets import Target, _under_transformation


class Laplace(NamedTuple):
    """What ``vi.laplace`` returns.

    Attributes:
      mode: ``(dim,)`` the maximizer of ``log p̃`` found.
      scale_tril: ``(dim, dim)`` lower Cholesky factor of ``H⁻¹``, ``H = -∇² log p̃(mode)``.
      precision: ``(dim, dim)`` ``H``.
      log_density: ``log p̃(mode)``.
      grad_norm: ``max |∇ log p̃(mode)|``.
      decrement: the Newton decrement there, ``gᵀH⁻¹g / 2`` in nats.
      num_iters: L-BFGS iterations run.
      num_newton: Newton steps taken after them.
      converged: ``decrement <= tol`` (see ``laplace``). ``vi.fit(precondition="laplace")``
        refuses a search that did not converge; a ``Laplace`` passed in is used with a warning.
    """

    mode: jax.Array
    scale_tril: jax.Array
    precision: jax.Array
    log_density: jax.Array
    grad_norm: jax.Array
    decrement: jax.Array
    num_iters: int
    num_newton: int
    converged: bool

    @property
    def posterior(self) -> MultivariateNormal:
        """``N(mode, H⁻¹)`` as a numpyro ``MultivariateNormal``."""
        return MultivariateNormal(self.mode, scale_tril=self.scale_tril)


def _mode_and_hessian(target, z0, max_iters, tol, ftol):
    def neg(z):
        return -target.log_density(z)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(neg)

    def step(carry):
        z, state, prev, stalls = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=neg)
        # A run of iterations that barely change the objective, at the dtype's resolution of
        # it (one alone happens on the way). No gradient test here: its units depend on the
        # parameters' scales; the Newton steps that follow judge the mode.
        stalled = jnp.abs(prev - value) <= ftol * jnp.maximum(1.0, jnp.abs(value))
        stalls = jnp.where(stalled, stalls + 1, 0)
        return optax.apply_updates(z, updates), state, value, stalls

    def keep_going(carry):
        _, state, value, stalls = carry
        count = otu.tree_get(state, "count")
        return (count == 0) | ((count < max_iters) & (stalls < _STALLS) & jnp.isfinite(value))

    inf = jnp.asarray(jnp.inf, z0.dtype)
    start = -neg(z0)
    z, state, _, _ = jax.lax.while_loop(
        keep_going, step, (z0, opt.init(z0), inf, jnp.zeros((), jnp.int32))
    )
    z, value, grad, hessian, newton = _newton(neg, z, tol)
    decrement = _newton_decrement(grad, hessian)
    return (z, _scale_tril_of_inverse(hessian), hessian, -value, jnp.max(jnp.abs(grad)),
            otu.tree_get(state, "count"), newton, decrement, start)


_STALLS = 10
_jitted = jax.jit(_mode_and_hessian)


def _jacobi(hessian):
    """``(d, S)``: ``S = diag(d) H diag(d)`` with unit diagonal (``d = 1/√H_ii``). Factoring
    ``S`` instead of ``H`` removes the parameters' scales from the condition number (kilpisjarvi:
    7e11 in raw coordinates, 2e5 for S), which float32 Cholesky factors cannot afford."""
    d = 1.0 / jnp.sqrt(jnp.diagonal(hessian))
    return d, d[:, None] * hessian * d[None, :]


def _scale_tril_of_inverse(hessian):
    """Lower Cholesky factor of ``H⁻¹``: ``diag(d) · chol(S⁻¹)`` (see ``_jacobi``)."""
    d, s = _jacobi(hessian)
    return d[:, None] * cholesky_of_inverse(s)


def _newton(neg, z, tol, hessian=None, max_steps=None):
    """Newton steps from the L-BFGS end point, each the first of 1, 1/2, 1/4, ... that lowers
    ``neg`` (or the full step if it leaves ``neg`` unchanged at the dtype's resolution): Newton
    is affine invariant, so a narrow ridge that L-BFGS crawls along (its first Hessian guess is
    a multiple of the identity) takes it a step or two. Stops at the mode (Newton decrement
    ``<= tol``), when no step is taken (or the Hessian is not positive definite there), or
    after ``max_steps`` (default ``_NEWTON_STEPS``). ``hessian(z)``: the matrix the steps use
    (default ``∇²neg``; any positive definite stand-in still gives descent steps, which the
    line search keeps). Returns ``(z, neg(z), ∇neg(z), hessian(z), steps taken)``."""
    hessian_fn = jax.hessian(neg) if hessian is None else hessian
    max_steps = _NEWTON_STEPS if max_steps is None else max_steps

    def derivatives(z):
        value, grad = jax.value_and_grad(neg)(z)
        # After the gradient, not beside it: with ``neg`` an average over draws (the mean's
        # polish) both are batched evaluations of the target (``_compile.after``).
        hessian = hessian_fn(_compile.after(z, value))
        return value, grad, 0.5 * (hessian + hessian.T)  # exact symmetry for the Cholesky

    def step(carry):
        z, value, grad, hessian, count, _ = carry
        d, s = _jacobi(hessian)
        direction = d * jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(s), True), d * grad)
        ts = 0.5 ** jnp.arange(_BACKTRACKS, dtype=z.dtype)
        candidates = z - ts[:, None] * direction
        values = jax.vmap(neg)(candidates)
        full_tie = (ts == 1.0) & (values <= value) & jnp.all(jnp.isfinite(direction))
        better = jnp.isfinite(values) & ((values < value) | full_tie)
        moved = jnp.any(better)
        new_z = jnp.where(moved, candidates[jnp.argmax(better)], z)
        new = derivatives(new_z)
        return (new_z, *new, count + moved.astype(jnp.int32), moved)

    def keep_going(carry):
        _, _, grad, hessian, count, moved = carry
        at_mode = _newton_decrement(grad, hessian) <= tol
        return moved & ~at_mode & (count < max_steps)

    init = (z, *derivatives(z), jnp.zeros((), jnp.int32), jnp.asarray(True))
    z, value, grad, hessian, count, _ = jax.lax.while_loop(keep_going, step, init)
    return z, value, grad, hessian, count


def _newton_decrement(grad, hessian):
    """``gᵀH⁻¹g / 2``: what a Newton step would gain, in nats. Affine invariant, and blind to
    an additive constant in ``log p̃`` (which a test relative to ``|log p̃|`` is not). NaN
    where the Hessian is not positive definite."""
    d, s = _jacobi(hessian)
    u = jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(s), d * grad, lower=True)
    return 0.5 * jnp.sum(u**2)


_NEWTON_STEPS = 20
_BACKTRACKS = 12


def laplace(target: Target, *, init=None, max_iters: int = 1000, tol: float | None = None,
            ftol: float | None = None) -> Laplace:
    """The Laplace approximation ``N(mode, H⁻¹)`` of ``target``'s posterior.

    Args:
      target: a ``vi.Target`` over R^dim.
      init: ``(dim,)`` starting point of the mode search (default zeros).
      max_iters: L-BFGS iterations at most.
      tol: the mode is reached when the Newton decrement ``gᵀH⁻¹g / 2`` (what a Newton step
        would still gain, in nats; the mode's error is about ``√(2 tol)`` posterior sds) is at
        most ``tol``: default 1e-10 in float64, 1e-5 in float32 (where rounding leaves ~1e-6
        on badly conditioned posteriors).
      ftol: L-BFGS hands over to Newton steps when 10 iterations in a row change ``log p̃`` by
        at most ``ftol · max(1, |log p̃|)`` (default ``10 eps`` of the dtype).

    Raises:
      ValueError: ``init`` has the wrong shape; or no proper mode was found: the search ended
        at a non-finite value, or below its starting value, or where the Hessian is not
        positive definite (an unbounded density such as a hierarchical funnel, or a saddle).

    >>> import jax.numpy as jnp, vi_engine as vi
    >>> t = vi.Target.from_log_density(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2 / 4.0), 2)
    >>> lap = vi.laplace(t)
    >>> [round(float(v), 3) for v in lap.mode], [round(float(v), 3) for v in lap.scale_tril[0]]
    ([1.0, 1.0], [2.0, 0.0])
    """
    if not isinstance(target, Target):
        raise TypeError(f"target: expected a vi.Target, got {type(target).__name__}")
    if _under_transformation(target, init):
        raise TypeError(
            "vi.laplace: called under a JAX transformation (jit, vmap, grad), or on a target "
            "or init holding tracers. The mode search runs its own compiled program and "
            "checks its result on the host, so it cannot be traced; for many targets use "
            "vi.laplace_many."
        )
    dtype, tol, settings = _search_settings(max_iters, tol, ftol)
    if init is None:
        z0 = jnp.zeros((target.dim,), dtype)
    else:
        z0 = jnp.asarray(init, dtype)
        if z0.shape != (target.dim,):
            raise ValueError(f"init: expected shape ({target.dim},), got {z0.shape}")
    _fit = importlib.import_module("vi_engine.fit")  # the module (``vi.fit`` is the function)

    args = (target, z0, *settings)
    # It runs once per target (milliseconds), and compiling it is the cost: the least effort.
    executable = _fit._executable(_jitted, ("laplace",), *args, effort=_compile.ONCE).result()
    (mode, scale_tril, precision, value, grad_norm, count, newton, decrement,
     start) = executable(*args)
    problem = None
    if not (bool(jnp.all(jnp.isfinite(mode))) and bool(jnp.isfinite(value))):
        problem = f"ended at a non-finite log density after {int(count)} L-BFGS iterations"
    elif float(value) < float(start):
        problem = (f"diverged: log p̃ fell from {float(start):.6g} at the start to "
                   f"{float(value):.6g} after {int(count)} L-BFGS iterations")
    elif not bool(jnp.all(jnp.isfinite(scale_tril))):
        eig = np.linalg.eigvalsh(np.asarray(precision, np.float64))
        problem = ("ended where the Hessian of -log p̃ is not positive definite (smallest "
                   f"eigenvalue {eig[0]:.3g})")
    if problem is not None:
        raise ValueError(
            f"vi.laplace: the mode search of target {target.name!r} {problem}: no proper mode "
            "(an unbounded density such as a hierarchical funnel, a saddle, or a bad init). "
            "Fit without precondition, reparameterize (e.g. non-centred), or pass init."
        )
    return Laplace(mode, scale_tril, precision, value, grad_norm, decrement, int(count),
                   int(newton), bool(decrement <= tol))


def _search_settings(max_iters, tol, ftol):
    """``(dtype, tol, (max_iters, tol, ftol) as arrays)`` for the mode search, with the defaults
    of ``laplace`` (see there); a clear error for a bad ``max_iters``."""
    max_iters = positive_int("max_iters", max_iters)
    for name, value in (("tol", tol), ("ftol", ftol)):
        if value is None:
            continue
        try:  # a number or a 0-d array of one (jnp.float32(1e-5)), not a bool
            ok = (not isinstance(value, (bool, np.bool_)) and np.ndim(value) == 0
                  and math.isfinite(float(value)) and float(value) >= 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}: expected a non-negative finite number or None (the "
                             f"default), got {value!r}")
    dtype = jnp.result_type(float)
    eps = float(jnp.finfo(dtype).eps)
    tol = (1e-10 if dtype == jnp.float64 else 1e-5) if tol is None else float(tol)
    ftol = 10 * eps if ftol is None else float(ftol)
    return dtype, tol, (jnp.asarray(max_iters, jnp.int32), jnp.asarray(tol, dtype),
                        jnp.asarray(ftol, dtype))


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


def supports(family) -> bool:
    """Whether ``family`` can be fitted preconditioned: a whitening keeps its structure (see
    ``whitening``)."""
    return isinstance(family, (FullRank, MeanField, LowRank))


def check_family(family):
    """Raise unless ``family`` can be fitted preconditioned (``supports``)."""
    if not supports(family):
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
    initial scale (``FullRank`` then starts at ``N(mode, H⁻¹)`` exactly, ``MeanField`` at the
    mean-field optimum for it; ``LowRank`` needs ``start_params``)."""
    return dataclasses.replace(family, init_scale=1.0)


# A low-rank fit started at its family's ``init`` in whitened coordinates (unit diagonal, a
# factor of 0.01-sized random values) is a mean-field start: the factor has to grow out of a
# near-saddle, and on a ridge Adam's noisy steps did not find the ridge's direction.
# Equicorrelated Gaussian, d = 10, correlation 0.9999, rank 1 (where the family holds the
# posterior exactly): 3 of 3 default fits and 2 of 2 preconditioned ones converged 0.64-1.16
# nats of KL short, each passing its checks; started from ``start_params``, 1e-4-3e-4.
def start_params(family, key, precision, lo):
    """Parameters over ``w`` (whitened by ``lo``, ``whitening``) to start ``start_family(family)``
    from, or ``None`` for its ``init`` (``FullRank``, ``MeanField``: already the Laplace
    approximation's optimum in the family). For ``LowRank`` of rank ``r``: the best
    approximation of ``N(0, H_w⁻¹)`` (``H_w`` the precision ``precision`` in ``w``, whose
    diagonal is 1) of the form ``s I + V diag(c) Vᵀ``, ``V`` the eigenvectors of the ``r``
    smallest eigenvalues ``μ`` of ``H_w`` (KL(q‖N(0, H_w⁻¹)): ``s I + V diag(c) Vᵀ`` is then
    exactly ``1/μ`` along ``V``, and ``s = (d − r) / Σ`` of the other eigenvalues), plus the
    family's own small random factor, so that no column is stuck at zero (drawn with ``key``
    folded with 4). Shapes: ``precision`` ``(dim, dim)``, ``lo`` ``(dim,)``, or with a leading
    batch axis ``B`` on both (``fit_many``: problem ``i`` draws with that key folded with ``i``).
    One compiled call (eager ``fold_in``s would each compile a program of their own)."""
    if not isinstance(family, LowRank):
        return None
    return _lowrank_start(family, key, precision, lo)


@functools.partial(jax.jit, static_argnums=0)
def _lowrank_start(family, key, precision, lo):
    key = jax.random.fold_in(key, 4)
    if lo.ndim == 2:
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(lo.shape[0]))
        return jax.vmap(functools.partial(_lowrank_start_one, family))(keys, precision, lo)
    return _lowrank_start_one(family, key, precision, lo)


def _lowrank_start_one(family, key, precision, lo):
    dim = lo.shape[-1]
    rank = min(family.rank, dim)
    h = lo[:, None] * precision * lo[None, :]
    mu, vecs = jnp.linalg.eigh(0.5 * (h + h.T))  # ascending
    tiny = jnp.finfo(mu.dtype).tiny
    if rank < dim:
        s = (dim - rank) / jnp.maximum(jnp.sum(mu[rank:]), tiny)
    else:  # no "other" directions: the diagonal takes half the smallest variance
        s = 0.5 / jnp.maximum(mu[-1], tiny)
    excess = jnp.maximum(1.0 / jnp.maximum(mu[:rank], tiny) - s, 0.0)
    factor = vecs[:, :rank] * jnp.sqrt(excess)[None, :]
    base = family.init(key, dim, lo.dtype)
    return LowRankParams(base.loc, factor + base.cov_factor,
                         jnp.full((dim,), 0.5, lo.dtype) * jnp.log(s))


def to_z(family, params, mode, lo) -> Any:
    """``family``'s parameters over ``w`` mapped to those over ``z = mode + lo w`` (``mode``:
    ``(dim,)``; ``lo``: ``(dim, dim)`` lower triangular, or ``(dim,)`` diagonal)."""
    return _map_params(family, params, mode, lo, True)


def to_w(family, params, mode, lo) -> Any:
    """The inverse of ``to_z``: parameters over ``z`` mapped to those over ``w``."""
    return _map_params(family, params, mode, lo, False)


def _modes_and_hessians(targets, z0, max_iters, tol, ftol):
    # One problem after another (lax.map): vmapped, the Newton loop's factorizations of the
    # problems' Hessians are batched LAPACK calls, two of which at once deadlock jaxlib 0.10 on
    # CPU (``_compile.after``); the searches are rare and short.
    return jax.lax.map(lambda t: _mode_and_hessian(t, z0, max_iters, tol, ftol), targets)


_jitted_many = jax.jit(_modes_and_hessians)


def laplace_many(targets: Target, *, max_iters: int = 1000, tol: float | None = None,
                 ftol: float | None = None):
    """``vi.laplace`` of each of a batch of targets (a ``Target`` built under ``jax.vmap``,
    leaves leading with ``B``), in one compiled call: ``(Laplace with (B, ...) fields, ok)``.

    ``ok`` is a ``(B,)`` NumPy mask of the problems with a proper mode that the search reached
    (where ``vi.laplace`` returns instead of raising, and ``converged``); the others' fields
    are whatever the search ended at. ``num_iters`` and ``num_newton`` are ``(B,)`` arrays,
    ``converged`` is ``ok``. Defaults as in ``vi.laplace``, from zeros; the same errors for bad
    settings.

    >>> import jax, jax.numpy as jnp, vi_engine as vi
    >>> mk = lambda m: vi.Target.from_log_density(lambda z, m: -0.5 * jnp.sum((z - m) ** 2), 2,
    ...                                          data=(m,))
    >>> lap, ok = laplace_many(jax.vmap(mk)(jnp.arange(6.0).reshape(3, 2)))
    >>> lap.mode.shape, ok.tolist()
    ((3, 2), [True, True, True])
    """
    if not isinstance(targets, Target):
        raise TypeError(f"targets: expected a batched vi.Target, got {type(targets).__name__}")
    dtype, tol, settings = _search_settings(max_iters, tol, ftol)
    _fit = importlib.import_module("vi_engine.fit")
    args = (targets, jnp.zeros((targets.dim,), dtype), *settings)
    executable = _fit._executable(_jitted_many, ("laplace_many",), *args,
                                  effort=_compile.ONCE).result()
    out = jax.device_get(executable(*args))
    (mode, scale_tril, precision, value, grad_norm, count, newton, decrement, start) = out
    batch = mode.shape[0]
    # The tests of ``laplace``, per problem: a finite end point, no lower than the start, a
    # positive definite Hessian there, and a converged search.
    ok = (np.isfinite(mode).reshape(batch, -1).all(1) & np.isfinite(value) & (value >= start)
          & np.isfinite(scale_tril).reshape(batch, -1).all(1) & (decrement <= tol))
    lap = Laplace(*(jnp.asarray(x) for x in (mode, scale_tril, precision, value, grad_norm,
                                               decrement)),
                  np.asarray(count), np.asarray(newton), ok)
    return lap, ok
