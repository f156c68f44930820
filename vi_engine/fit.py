"""The compiled fit loop: ``vi.fit`` for one problem, ``vi.fit_many`` for a batch of problems.

The optimization runs as one jitted function per window of steps (a ``lax.scan`` over steps,
skipped by a ``lax.cond`` once the problem is done). Python dispatches a few windows at a time,
then only reads the ``done`` flags and updates the progress bar; every decision (step, step-size
decay, stopping, NaN guard) is made inside the compiled code, per problem, so ``fit_many`` is the
same window function under ``jax.vmap``.

Stopping rule (``tol`` set). A noisy ELBO defeats a raw relative-change test (Stan's
``tol_rel_obj`` stops too early; a plateau test on single steps never triggers). Here the losses
are averaged over windows of ``window`` steps; a window *improves* when its mean beats the best
window so far by more than ``max(tol, z · standard error of the window mean)``. After ``patience``
windows without improvement the step size is halved (the noise of the iterates shrinks with it);
after ``max_decays`` halvings without escaping the plateau the fit has converged. The reported
parameters are the average of the iterates over the last window (Polyak–Ruppert averaging), which
removes most of the remaining jitter. The defaults were chosen by measurement on the exact
problems (see the README and ``benchmarks/``).

NaN guard. A window whose losses or parameters are not finite is rolled back to its start and
the fit stops with status ``"nonfinite"``; ``vi.fit`` (and ``vi.fit_many``, for each such
problem) then replays that window up to its first non-finite step, so it keeps the last
parameters with a finite loss and update (those before a step whose loss was not finite: the
parameters that loss was evaluated at may already overflow q), and says at which step and why.

Compilation (what a first call costs, measured on 2 CPU cores). Nothing runs eagerly: keys are
split, parameters initialized and the posterior distribution built inside compiled code (eager
ops each compile a small program: they had cost 3 s of a 5.4 s first fit). With ``tol=None``
and no progress bar the setup and every step are ONE executable, which is what ``fit_many`` and
short fixed-step fits want; until convergence, the setup and the window are two, compiled ahead
of time on a worker thread and cached by signature. On both paths the posterior is a small
program of its own, and so is the final ELBO estimate, lowered with the fit and compiled when
``FitResult.elbo`` is first read. The compile effort follows how much a program will run
(``vi_engine/_compile.py``): least for the setup, the posterior and the final ELBO, less for
windows (and single executables) of cheap steps per problem (a linear regression's window:
1.0 s instead of 2.2 s; 1000 small logistic regressions in fit_many: 0.44 s instead of 0.97 s).
Python's cyclic GC is paused while programs are traced and
lowered (``_compile.gc_paused``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from tqdm.auto import tqdm

from vi_engine import _compile
from vi_engine._checks import is_int as _is_int
from vi_engine._checks import is_real as _is_real
from vi_engine._checks import positive_int as _positive_int
from vi_engine.families import Family, FullRank, LowRank, MeanField, get_family
from vi_engine.families.gaussian import FullRankParams, LowRankParams, MeanFieldParams
from vi_engine.objectives import (
    ELBO,
    Estimate,
    Renyi,
    check_key,
    check_params,
    check_target,
    elbo,
    get_objective,
    warn_nonfinite,
)
from vi_engine.targets import Target, _under_transformation, check_batch

# Status codes, kept as int32 inside the compiled loop.
RUNNING, CONVERGED, MAX_STEPS, NONFINITE = 0, 1, 2, 3
_STATUS_NAMES = {
    RUNNING: "running",
    CONVERGED: "converged",
    MAX_STEPS: "max_steps",
    NONFINITE: "nonfinite",
}

DEFAULT_TOL = 1e-3
DEFAULT_MAX_STEPS = 20_000
DEFAULT_LEARNING_RATE = 0.05


DEFAULT_B2 = 0.99


@functools.cache
def default_optimizer(learning_rate: float = DEFAULT_LEARNING_RATE) -> optax.GradientTransformation:
    """Adam(learning_rate, b2=0.99); cached so that repeated fits reuse compiled code.

    Why b2 = 0.99 rather than Adam's 0.999: one heavy-tailed draw inflates Adam's second-moment
    estimate, and with b2 = 0.999 it takes ~1000 steps to decay, during which the steps are tiny
    and the stopping rule reads a plateau. Measured on eight schools (non-centred, full-rank, 4
    seeds): b2 = 0.999 stopped once 1.2 nats below the optimum ELBO (-32.81 vs -31.55); b2 = 0.99
    reached -31.53 to -31.60 on all four, and still fits Bayesian linear regression (N=500, d=20)
    to KL(q‖p*) < 1e-4.

    >>> import vi_engine as vi
    >>> vi.default_optimizer(0.01) is vi.default_optimizer(0.01)  # one object: no recompiling
    True
    """
    return optax.adam(learning_rate, b2=DEFAULT_B2)


class StoppingRule(NamedTuple):
    """Settings of the windowed plateau test (static: changing them recompiles).

    The defaults were chosen by a sweep on Bayesian linear regression (N=500, d=20, 3 seeds,
    Adam 0.05): window 100 / patience 1 stopped with full-rank KL(q‖p*) up to 0.056; window 200 /
    patience 2 / 6 cuts reached KL < 1e-4 (full-rank) and within 0.002 nats of the mean-field
    optimum in about 4,000 steps. A smaller initial step (0.02) was worse: its slow early progress
    reads as a plateau and the step size is cut too soon.

    - ``window``: steps per window; losses are averaged over a window.
    - ``patience``: windows without significant improvement before the step size is cut.
    - ``factor``: step-size multiplier at each cut.
    - ``max_decays``: the fit has converged at the first plateau after this many cuts (each cut
      itself follows ``patience`` windows without significant improvement).
    - ``z``: an improvement must exceed ``z`` standard errors of the window mean (and ``tol``).

    >>> import vi_engine as vi
    >>> rule = vi.StoppingRule(window=100, max_decays=4)  # vi.fit(..., stopping=rule)
    >>> rule.window, rule.patience, rule.max_decays
    (100, 2, 4)
    """

    window: int = 200
    patience: int = 2
    factor: float = 0.5
    max_decays: int = 6
    z: float = 2.0


DEFAULT_STOPPING = StoppingRule()


class _State(NamedTuple):
    params: Any
    opt_state: Any
    avg_params: Any  # running mean of the iterates over the current window
    step: jax.Array  # steps applied so far (int32)
    lr_scale: jax.Array
    best: jax.Array  # best window-mean loss since the last cut
    patience: jax.Array
    num_decays: jax.Array
    done: jax.Array
    status: jax.Array
    bad_step: jax.Array  # step at which a non-finite loss or gradient appeared, else -1


class _Config(NamedTuple):
    family: Family
    objective: Any
    optimizer: optax.GradientTransformation
    num_samples: int
    window: int
    check_plateau: bool
    mask_steps: bool
    rule: StoppingRule
    presample: bool = False  # the window's noise drawn before its steps (``_with_presample``)
    # NaN replay only (with ``mask_steps``): a step whose loss or new parameters are not finite
    # is not applied, and no later step is (``done`` marks it); ``step`` then says where.
    guard_steps: bool = False


# Up to this many noise elements (window x draws x dim x problems) are drawn before a window's
# steps; beyond, each step draws its own. At the limit XLA's temporaries grow by about 72 MiB
# (measured, float32 and float64).
_PRESAMPLE_BUDGET = 2**22
# What XLA counts once per step of a window, not once per program as the step itself (a scan
# body counts once): so it is not counted when the window's compile effort is chosen by its
# per-step flops (``_window_tiers``). It matters for the single executable of ``tol=None``,
# whose window is all its steps. Measured on jax 0.10 (tests/test_fit.py checks them) for
# threefry keys with ``jax_threefry_partitionable`` on (jax's default) only; for other random
# setups nothing is allowed, which leans towards XLA's full effort (other setups count less:
# an ``unsafe_rbg`` step 20 flops, a partitionable-off normal 58).
# - one standard-normal draw of the pre-drawn noise (threefry and the inverse erf), by item
#   size: 71 in float32, 137 in float64;
# - the step's key and the window's checks of its loss: 45 with pre-drawn noise, 43 without,
#   in either precision (450k flops at 10,000 steps).
_NORMAL_FLOPS = {4: 71, 8: 137}
_STEP_FLOPS = {True: 45, False: 43}


@dataclasses.dataclass(frozen=True)
class _Presampled:
    """``family`` inside a step whose noise was drawn before the window: the objective passes
    the step's noise where it would pass a key, and it is used as the draws themselves."""

    family: Family

    @property
    def name(self):
        return self.family.name

    @property
    def has_entropy(self):
        return self.family.has_entropy

    def sample(self, eps, params, num_samples):
        return self.family.from_noise(params, eps)[0]

    def sample_and_log_prob(self, eps, params, num_samples):
        return self.family.from_noise(params, eps)

    def log_prob(self, params, z):
        return self.family.log_prob(params, z)

    def entropy(self, params):
        return self.family.entropy(params)


def _with_presample(cfg, dim, batch, key):
    """``cfg`` with ``presample`` set when a window's noise can be drawn before its steps and
    be the very draws each step would make:

    - the objective is ``ELBO`` itself (its draws per step are ``num_samples``; a subclass may
      use its key otherwise);
    - the family separates its noise, and samples through it (a subclass that overrides
      ``sample`` or ``sample_and_log_prob`` keeps its own sampler);
    - the key is a threefry key (vectorized draws over ``rbg`` keys differ from per-key ones);
    - the window's noise is within ``_PRESAMPLE_BUDGET``.
    """
    family = cfg.family
    ok = type(cfg.objective) is ELBO and family.has_noise
    if ok:
        owner = next(c for c in type(family).__mro__ if "from_noise" in vars(c))
        ok = all(getattr(type(family), m) is getattr(owner, m)
                 for m in ("noise", "sample", "sample_and_log_prob"))
    ok = ok and _is_threefry(key)
    return cfg._replace(presample=bool(ok and _noise_size(cfg, dim, batch) <= _PRESAMPLE_BUDGET))


def _is_threefry(key):
    return str(jax.random.key_impl(key)) == "threefry2x32"


def _noise_size(cfg, dim, batch):
    """Noise elements of one window: steps x draws per step x dim x problems."""
    return cfg.window * cfg.num_samples * dim * (batch or 1)


def _window_tiers(cfg, dim, batch, dtype, key):
    """The compile-effort tiers of ``cfg``'s window (``_compile.WINDOW``): their flop limits are
    per problem (times ``batch`` for a batch of problems), raised by the flops of the window's
    pre-drawn noise and of its steps' keys and checks (``_STEP_FLOPS``), so that only the step
    itself counts.

    Per problem, not per program: what makes the cheaper code slower is a large problem
    (full-rank d=100: 2.4x slower per step), not many small ones side by side. Measured on 2
    cores, fixed 1,000-step fits (tol=None) at ``"fast"`` vs XLA's defaults: B=1000 logistic
    regressions (N=50, d=3) compiled in 0.44 vs 0.97 s (mean-field) and 0.50 vs 1.14 s
    (full-rank) and ran at the same speed; B=100 mean-field (N=1000, d=10) 0.51 vs 1.78 s, same
    speed; B=100 full-rank (N=200, d=20) 0.60 vs 1.30 s, and ran 11% faster.
    """
    extra = 0
    measured = jax.config.jax_threefry_partitionable and _is_threefry(key)
    itemsize = jnp.dtype(dtype).itemsize
    if measured and itemsize in _NORMAL_FLOPS:
        extra += _NORMAL_FLOPS[itemsize] * _noise_size(cfg, dim, batch) if cfg.presample else 0
        extra += _STEP_FLOPS[cfg.presample] * cfg.window * (batch or 1)
    return tuple((effort, limit * (batch or 1) + extra) for effort, limit in _compile.WINDOW)


def _tree_where(pred, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _all_finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in leaves], jnp.asarray(True)
    )


def _init_state(optimizer, params, dtype):
    return _State(
        params=params,
        opt_state=optimizer.init(params),
        avg_params=params,
        step=jnp.zeros((), jnp.int32),
        lr_scale=jnp.ones((), dtype),
        best=jnp.full((), jnp.inf, dtype),
        patience=jnp.zeros((), jnp.int32),
        num_decays=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool),
        status=jnp.full((), RUNNING, jnp.int32),
        bad_step=jnp.full((), -1, jnp.int32),
    )


def _update(optimizer, grads, opt_state, params, loss):
    """``optimizer.update``, with ``value=loss`` for optax's transformations that take extra
    arguments (``optax.contrib.reduce_on_plateau`` needs it; a chain passes it on to the
    members that take it, and the others ignore it)."""
    if not isinstance(optimizer, optax.GradientTransformationExtraArgs):
        return optimizer.update(grads, opt_state, params)
    try:
        return optimizer.update(grads, opt_state, params, value=loss)
    except TypeError as err:
        if "required keyword-only argument" not in str(err):
            raise
        raise ValueError(
            f"optimizer: its update needs more than the loss vi_engine passes as value=: "
            f"{err}. Line searches (value_fn=, grad=) need a deterministic objective; a fit's "
            "loss is a Monte Carlo estimate. Use a step-size optimizer (optax.adam, a "
            "schedule, reduce_on_plateau...)."
        ) from None


def _make_window(cfg: _Config, skip_when_done: bool = True):
    """``window(state, key, target, tol, max_steps) -> (state, losses (window,))``, uncompiled.

    A step is exactly a hand-written ``lax.scan`` step (sample, gradient, optax update): the
    done test, the NaN guard and the step cap act once per window. A window whose losses or
    parameters are not finite is rolled back to its start, the last finite parameters, and the
    fit stops there with the first non-finite step named. Only a fixed-steps run whose step count
    is not a whole number of windows masks steps individually (``cfg.mask_steps``). With
    ``skip_when_done=False`` the window always runs (for a fresh state, where ``done`` is False).
    """
    family, objective, optimizer = cfg.family, cfg.objective, cfg.optimizer
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    step_family = _Presampled(family) if cfg.presample else family

    def step(carry, k, target, max_steps):
        state, w_count = carry
        (objective_loss, value), grads = grad_fn(state.params, k, step_family, target,
                                                 cfg.num_samples)
        updates, opt_state = _update(optimizer, grads, state.opt_state, state.params,
                                     objective_loss)
        if cfg.check_plateau:  # the step-size cuts of the stopping rule
            updates = jax.tree_util.tree_map(
                lambda u: u * state.lr_scale.astype(u.dtype), updates
            )
        params = optax.apply_updates(state.params, updates)
        loss = -value
        done = state.done
        if cfg.mask_steps:
            ok = state.step < max_steps
            if cfg.guard_steps:
                ok = ok & ~done
                # The loss at z drawn from finite parameters, and the update (a NaN/inf
                # gradient with a finite loss shows only in the new parameters).
                good = jnp.isfinite(loss) & _all_finite(params)
                done = done | (ok & ~good)
                ok = ok & good
            params = _tree_where(ok, params, state.params)
            opt_state = _tree_where(ok, opt_state, state.opt_state)
            loss = jnp.where(ok, loss, jnp.nan)
            ok = ok.astype(jnp.int32)
        else:
            ok = 1
        w_count = w_count + ok
        if cfg.check_plateau:  # the averaged iterate is used only by the stopping rule
            n = w_count.astype(state.lr_scale.dtype)
            avg = jax.tree_util.tree_map(lambda a, p: a + (p - a) / n, state.avg_params, params)
        else:
            avg = state.avg_params
        state = state._replace(
            params=params, opt_state=opt_state, avg_params=avg, step=state.step + ok, done=done
        )
        return (state, w_count), loss.astype(state.lr_scale.dtype)

    def run(state, key, target, tol, max_steps):
        start = state
        state = state._replace(avg_params=state.params)
        # Step i draws with fold_in(key, i) whatever the windowing (progress bar or not), and
        # the keys of a window are made in one vectorized call, not one threefry per step.
        steps = state.step + jnp.arange(cfg.window, dtype=state.step.dtype)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, steps)
        if cfg.presample:  # the same draws as each step's own, made in one vectorized call
            keys = jax.vmap(lambda k: family.noise(k, state.params, cfg.num_samples))(keys)
        # The data stay loop invariants (closed over, not carried): carried, XLA copied them
        # every step (measured: 33 µs/step at N=1e4, d=20).
        body = functools.partial(step, target=target, max_steps=max_steps)
        init = (state, jnp.zeros((), jnp.int32))
        (state, count), losses = jax.lax.scan(body, init, keys)
        ran = jnp.arange(cfg.window) < count
        finite = jnp.all(jnp.isfinite(losses) | ~ran) & _all_finite(state.params)
        # Not in a NaN replay: should it not meet the fault again (a separately compiled
        # program), its window must not cut the step size or swap in averaged parameters.
        if cfg.check_plateau and not cfg.guard_steps:
            state = _plateau_update(state, losses, count, tol, cfg.rule, cfg.window)
        hit_cap = ~state.done & (state.step >= max_steps)
        state = state._replace(
            done=state.done | hit_cap,
            status=jnp.where(hit_cap, MAX_STEPS, state.status).astype(jnp.int32),
        )
        # The first non-finite loss; with none (a NaN/inf gradient shows only in the
        # parameters), the window's end. The replay finds the exact step (``guard_steps``).
        bad_loss = ~jnp.isfinite(losses) & ran
        first_bad = jnp.where(jnp.any(bad_loss), jnp.argmax(bad_loss), count).astype(jnp.int32)
        rolled_back = start._replace(
            done=jnp.asarray(True),
            status=jnp.asarray(NONFINITE, jnp.int32),
            bad_step=start.step + first_bad,
        )
        # A cond, not a select per state leaf: 14 fewer kernels to compile (73 -> 59 fusions for a
        # full-rank window). Under vmap (fit_many) it becomes the selects again.
        return jax.lax.cond(finite, lambda: state, lambda: rolled_back), losses

    def skip(state, key, target, tol, max_steps):
        return state, jnp.full((cfg.window,), jnp.nan, state.lr_scale.dtype)

    def window(state, key, target, tol, max_steps):
        return jax.lax.cond(state.done, skip, run, state, key, target, tol, max_steps)

    return window if skip_when_done else run


def _plateau_update(state, losses, count, tol, rule, window):
    dtype = state.lr_scale.dtype
    # Judge only complete windows of a running fit. Their losses are all finite (a window with a
    # non-finite loss is rolled back), so no NaN-aware statistics are needed.
    full = count == window
    mean = jnp.mean(losses)
    stderr = jnp.std(losses) / math.sqrt(window)
    threshold = jnp.maximum(tol, rule.z * stderr)
    improved = (state.best - mean) > threshold
    patience = jnp.where(improved, 0, state.patience + 1)
    best = jnp.where(improved, mean, state.best)
    cut = patience >= rule.patience
    num_decays = state.num_decays + cut.astype(jnp.int32)
    converged = num_decays > rule.max_decays
    new = state._replace(
        lr_scale=jnp.where(cut, state.lr_scale * rule.factor, state.lr_scale).astype(dtype),
        best=jnp.where(cut, mean, best).astype(dtype),
        patience=jnp.where(cut, 0, patience).astype(jnp.int32),
        num_decays=num_decays,
        done=state.done | converged,
        status=jnp.where(converged, CONVERGED, state.status).astype(jnp.int32),
        # On convergence report the averaged iterate of the final window.
        params=_tree_where(converged, state.avg_params, state.params),
    )
    return _tree_where(full & ~state.done, new, state)


@functools.lru_cache(maxsize=64)
def _compiled_window(cfg: _Config, batched: bool, cap_per_problem: bool = False):
    fn = _make_window(cfg)
    return jax.jit(_over_problems(fn, cap_per_problem) if batched else fn)


def _over_problems(window, cap_per_problem=False):
    """``window`` vmapped over problems (state, key, target); tol shared, and the step cap
    shared too except in fit_many's NaN replay."""
    return jax.vmap(window, in_axes=(0, 0, 0, None, 0 if cap_per_problem else None))


def _setup_fn(family, optimizer, dim, dtype, batch):
    """``setup(key, init_params) -> (state, run_key, final_key)``, uncompiled.

    The key is split inside the compiled code: an eager ``jax.random.split`` compiles its own
    small programs (~0.25 s in a fresh process, measured), which a first fit would pay for.
    ``batch`` is ``None`` for one problem, else the number of problems (one key each).
    """

    def one(k_init, init_params):
        params = family.init(k_init, dim, dtype) if init_params is None else init_params
        return _init_state(optimizer, params, dtype)

    def setup(key, init_params):
        keys = jax.random.split(key, 3)
        if batch is None:
            return one(keys[0], init_params), keys[1], keys[2]
        # One vectorized split (the same keys as three): each threefry instance is ~10 fused
        # kernels to compile (measured 0.54 s -> 0.40 s for this setup).
        k_init, k_run, k_final = jax.vmap(lambda k: jax.random.split(k, batch))(keys)
        # init_params (fit_many): one slice per problem, each leaf leading with ``batch``.
        return jax.vmap(one)(k_init, init_params), k_run, k_final

    return setup


def _final_fn(family):
    """``final(params) -> posterior parts``, uncompiled.

    The posterior distribution is built inside the compiled code too: numpyro distributions are
    pytrees, and building a ``MultivariateNormal`` eagerly (with numpyro's argument validation,
    on by default) ran ~40 small ops, each compiled on first use: 2.4 s of a 5.4 s first fit.
    ``_posterior`` assembles the parts.
    """

    def final(params):
        posterior = family.to_distribution(params)
        return posterior, _lazy_moments(posterior)

    return final


def _estimate_fn(family, num_samples, batched):
    """``estimate(key, params, target) -> Estimate``: the final ELBO, uncompiled."""

    def one(key, params, target):
        return elbo(key, family, params, target, num_samples)

    return jax.vmap(one) if batched else one


# The stationarity check (``FitResult.stationarity``): draws, per vmapped batch, and the level
# above which a converged fit is reported as short of its family's optimum. Measured on
# posteriordb at 256 draws: every fit that matches the reference (7 posteriors, full-rank and
# mean-field, plain and preconditioned) gives max |z| 1.0-4.2 over its 5-65 components; the
# default full-rank fits of kidiq and kilpisjarvi, converged 1.9-2.5 sds off, 87 and 375, and
# kilpisjarvi's mean-field fit 9.8. The max of K standard normals passes 6 with probability
# under 1e-4 for K up to 10^4.
_CHECK_DRAWS = 256
# At most this many gradient elements per batch (draws x parameters), else the draws are taken
# in a scan of smaller batches: a full-rank q with d=1000 has 10^6 parameters, so its batches
# shrink to 4 draws (16 MiB in float32); at d=20 (440 parameters) all 256 go in one.
_CHECK_BUDGET = 2**22
# Its compile effort: LLVM -O0 up to 2e10 flops (XLA's count, a scan body once), measured up
# to 1.3e10, where -O0 still came out ahead counting compile and two runs. Fresh processes,
# compile / warm run at -O0 vs -O1: mean-field linear regression N=500, d=20 (2.4e7 flops, with
# the mean gap) 0.18-0.20 / 0.005 s vs 0.34-0.41 / 0.002 s; d=200 0.26 / 0.015 vs 0.46 / 0.007;
# N=2000, d=1000 0.42 / 0.19 vs 0.59 / 0.15; full-rank N=400, d=200 0.31 / 0.14 vs 0.38 / 0.12.
_CHECK_TIERS = (("minimal", 2e10), ("fast", math.inf))
STATIONARITY_LIMIT = 6.0


def _stationarity(key, family, params, target, budget=None, with_draws=False):
    """Max over the parameters' components of |mean| / standard error of the per-draw ELBO
    gradient at ``params``: reparameterized, with the closed-form entropy where the family has
    one (``elbo-entropy``), else the plain estimator (``elbo-reparam``). Not the
    sticking-the-landing estimator of the fit: its variance vanishes where q equals the
    posterior, so mean and standard error shrink together and their ratio does not go to zero
    (exact Gaussian fits read 11-13, measured). Of the two, the closed-form entropy separates
    better. For a full-rank q the test is made in q's whitened coordinates (below).

    At the family's optimum the gradient's mean is zero, so each component is about N(0, 1):
    the max over K components stays under ~5 for K up to 10^5. A fit that stopped short of the
    optimum (a ridge Adam could not follow) gives a mean gradient many standard errors from zero.
    The draws are the final ELBO's key folded with 1 (different draws). NaN if a gradient is not
    finite. ``with_draws``: return ``(stationarity, (gw, eps))``, the draws ``eps`` ``(n, dim)``
    and the target's gradients at them whitened by q's scale, ``gw = Lᵀ∇log p̃(μ + Lε)`` (for
    ``_spread_gap``), where the family is location-scale and all draws fit one batch, else
    ``(stationarity, None)``.
    """
    key = jax.random.fold_in(key, 1)
    location_scale = isinstance(family, (FullRank, MeanField)) and params.loc.ndim == 1
    scale = jnp.exp(params.log_scale) if isinstance(family, MeanField) else None
    if location_scale:
        grad, params = _location_scale_gradients(family, params, target)
        draws = family.noise(key, params, _CHECK_DRAWS)  # one sampler call for all draws
    else:
        log_density = target.log_density

        def per_draw(p, k):
            z = family.sample(k, p, 1)
            if family.has_entropy:
                return log_density(z[0]) + family.entropy(p)
            return log_density(z[0]) - family.log_prob(p, z)[0]

        grad = jax.vmap(jax.grad(per_draw), in_axes=(None, 0))
        draws = jax.random.split(key, _CHECK_DRAWS)
    tree_map = jax.tree_util.tree_map
    size = sum(x.size for x in jax.tree_util.tree_leaves(params))
    per_batch = _CHECK_DRAWS
    budget = _CHECK_BUDGET if budget is None else budget
    while per_batch > 1 and per_batch * size > budget:
        per_batch //= 2

    def moments(g):  # of a batch of per-draw gradients
        b_mean = tree_map(lambda x: jnp.mean(x, 0), g)
        return b_mean, tree_map(lambda x, m: jnp.sum(jnp.square(x - m[None]), 0), g, b_mean)

    def batch(carry, inputs):  # Chan et al.'s pairwise update of the mean and sum of squares
        n, mean, m2 = carry
        b_mean, b_m2 = moments(grad(params, inputs))
        total = n + per_batch
        delta = tree_map(jnp.subtract, b_mean, mean)
        mean = tree_map(lambda a, d: a + d * (per_batch / total), mean, delta)
        m2 = tree_map(lambda a, b, d: a + b + jnp.square(d) * (n * per_batch / total),
                      m2, b_m2, delta)
        return (total, mean, m2), None

    n = _CHECK_DRAWS
    pair = None
    if per_batch == _CHECK_DRAWS:
        # No loop when all draws fit the budget: a scan and its carry made the program of a
        # d=20 full-rank check twice as slow to compile (0.17-0.23 s vs 0.09 s, measured).
        g = grad(params, draws)
        mean, m2 = moments(g)
        if location_scale:  # the loc part: Lᵀ∇log p̃ (full-rank), ∇log p̃ (mean-field)
            pair = (g.loc if scale is None else g.loc * scale, draws)
    else:
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        zeros = tree_map(jnp.zeros_like, params)
        batches = draws.reshape(_CHECK_DRAWS // per_batch, per_batch, *draws.shape[1:])
        (n, mean, m2), _ = jax.lax.scan(batch, (jnp.zeros((), dtype), zeros, zeros), batches)

    def z_max(mean, m2):
        se = jnp.sqrt(m2 / (n - 1) / n)
        # No spread: zero if the component's gradient is exactly zero (an unused parameter),
        # else infinitely many standard errors from it.
        z = jnp.where(se > 0, jnp.abs(mean) / jnp.where(se > 0, se, 1), jnp.where(mean == 0, 0,
                                                                                   jnp.inf))
        return jnp.max(z)

    z = functools.reduce(jnp.maximum, jax.tree_util.tree_leaves(tree_map(z_max, mean, m2)))
    return (z, pair) if with_draws else z


def _location_scale_gradients(family, params, target):
    """``(grad, params)`` for ``_stationarity`` with a ``FullRank`` or ``MeanField`` q:
    ``grad(params, eps)`` gives the per-draw ELBO gradients (closed-form entropy) in the
    parameters' pytree for standard-normal draws ``eps`` ``(n, dim)``, from the target's
    gradient alone.

    For a full-rank q the test is made in q's own whitened coordinates ``w = L⁻¹(z − μ)``, where
    q is ``N(0, I)`` (a component test in the raw parameters misses a ridge: its signal lies
    along a flat direction that the steep ones' noise swamps; kidiq's failed fit read 7.7 there,
    87 here), so the parameters are those of ``N(0, I)`` and, with ``g = Lᵀ ∇log p̃(μ + Lε)``
    (the whitened log density's gradient at ``w = ε``), the gradients are ``g`` (loc),
    ``g ⊙ ε + 1`` (log-diagonal: the entropy's gradient is 1) and ``tril(g εᵀ, −1)``
    (off-diagonal). Mean-field, in its own parameters: ``g = ∇log p̃(μ + σ ⊙ ε)`` (loc) and
    ``g ⊙ σ ⊙ ε + 1`` (log-scale). The same gradients as ``jax.grad`` through the family's
    sampler and the whitened target (tested), but a program ~3x quicker to trace, lower and
    compile, which a first fit waits for.
    """
    grad_z = jax.grad(target.log_density)
    loc = params.loc
    dim, dtype = loc.shape[-1], loc.dtype
    if isinstance(family, FullRank):
        lo = family.scale_tril(params)

        def one(eps):
            g = grad_z(loc + lo @ eps) @ lo
            return FullRankParams(g, g * eps + 1, jnp.tril(jnp.outer(g, eps), -1))

        identity = FullRankParams(jnp.zeros_like(loc), jnp.zeros_like(loc),
                                  jnp.zeros((dim, dim), dtype))
        return (lambda _, eps: jax.vmap(one)(eps)), identity
    scale = jnp.exp(params.log_scale)

    def one_mf(eps):
        g = grad_z(loc + scale * eps)
        return MeanFieldParams(g, g * scale * eps + 1)

    return (lambda _, eps: jax.vmap(one_mf)(eps)), params


# The mean-gap check (``FitResult.mean_gap``) of MeanField and LowRank fits: their stationarity
# check is made in q's own coordinates, which do not see a ridge of the posterior (q has no
# correlations to whiten with). Measured on posteriordb (float32 and float64, 2 seeds each):
# fits that match the reference read -0.12-0.10 nats; the default mean-field fits of kidiq,
# 1.9-2.3 reference sds off, 1.9-3.0 nats with stationarity 1.9-2.2 (undetected before), and
# its low-rank fits 7.5-8.1 nats; kilpisjarvi mean-field 2.9-3.1 (stationarity 12.6).
MEAN_GAP_LIMIT = 0.25


def _has_mean_gap(family, dim, budget=None):
    """Whether the check computes ``_mean_gap``: for these families, where the Hessian's d²
    numbers fit ``budget``, the check's memory budget per problem (``_CHECK_BUDGET`` for one)."""
    budget = _CHECK_BUDGET if budget is None else budget
    return isinstance(family, (MeanField, LowRank)) and dim * dim <= budget


def _mean_gap(key, family, params, target, with_draws=False):
    """``Estimate`` (nats) of the ELBO that moving q's mean to its optimum would gain, q's
    spread held: the Newton decrement ``½ ḡᵀH⁻¹ḡ`` of the ELBO's gradient in the mean,
    ``ḡ = E_q[∇log p̃(z)]``, at ``H = −∇²log p̃(μ)``; exact for a Gaussian target.

    ``ḡ`` is averaged over ``_CHECK_DRAWS`` draws with a Taylor control variate,
    ``∇log p̃(z) + H(z − μ)`` (``E_q[z − μ] = 0``): on a Gaussian target it has no variance at
    all, which the plain average's noise would swamp on a ridge. The estimate is debiased by
    the noise's own expected contribution ``½ tr(H⁻¹C)/n`` (``C`` the draws' covariance), and
    ``stderr`` is the delta method's. ``NaN`` where ``H`` is not positive definite (no verdict:
    a funnel's neck, or a saddle). ``H`` is Jacobi-scaled before its Cholesky factorization,
    as in ``vi.laplace`` (``preconditioning._jacobi``): the posteriors where this matters are
    the badly scaled ones. ``with_draws``: return ``(gap, (g, z − μ))`` too, the draws and the
    target's gradients there, ``(n, dim)`` each (a low-rank q's spread gap:
    ``_lowrank_spread_gap``).
    """
    from vi_engine import preconditioning as lp

    loc = params.loc
    n = _CHECK_DRAWS
    z = family.sample(jax.random.fold_in(key, 3), params, n)
    g_raw = jax.vmap(jax.grad(target.log_density))(z)
    # The Hessian (batched over the dim directions) after the draws' gradients (``_compile.after``).
    hess = -jax.hessian(target.log_density)(_compile.after(loc, jnp.sum(g_raw)))
    g = g_raw + (z - loc) @ hess.T
    d, s = lp._jacobi(hess)
    chol = jnp.linalg.cholesky(s)
    # Whitened: |u_i|² = g_iᵀ H⁻¹ g_i (u_i = chol⁻¹ diag(d) g_i), as in _newton_decrement.
    u = jax.scipy.linalg.solve_triangular(chol, (g * d).T, lower=True).T  # (n, dim)
    u_bar = jnp.mean(u, 0)
    resid = u - u_bar
    noise = 0.5 * jnp.sum(jnp.square(resid)) / ((n - 1) * n)
    cov = resid.T @ resid / ((n - 1) * n)  # the whitened mean's covariance
    var = jnp.mean(jnp.square(resid @ u_bar)) / n + 0.5 * jnp.sum(jnp.square(cov))
    gap = 0.5 * jnp.sum(jnp.square(u_bar)) - noise
    ok = jnp.all(jnp.isfinite(chol))
    gap = Estimate(jnp.where(ok, gap, jnp.nan), jnp.where(ok, jnp.sqrt(var), jnp.nan))
    return (gap, (g_raw, z - loc)) if with_draws else gap


# The spread-gap check (``FitResult.spread_gap``) of FullRank and MeanField fits: a slow
# optimizer (``optax.sgd(1e-4)``, full-rank, N=500, d=20 linear regression) met the plateau
# test with q's covariance 0.94-1.99 nats of KL from the posterior's while the stationarity
# check read 5.0-5.7 (its per-draw gradients' noise swamps a scale that is off in every
# direction a little). The estimate (a least-squares fit of the gradients to the draws) has no
# noise at all on a Gaussian target (0.9425 against an exact 0.9426, 1.9858 against 1.986,
# measured). At exact optima of non-Gaussian targets (review: Student-t products, logistic
# regressions with their true gap from 200k draws, 300 check keys each) it read under 0.03
# for d <= 32, but 0.1-0.4 at d = 64 (higher-order terms of log det as the eigenvalues spread),
# which flagged a default d = 64 logistic fit falsely: hence 8 draws per dimension.
# The limit, 0.1 nats (0.25 at first, like the mean gap's): on the eight posteriordb posteriors
# (float64, full-rank and mean-field, 3 seeds; 16 check runs pooled) every fit at its optimum
# read 0.000-0.03, while the default full-rank fits of gp_pois_regr, 0.34-0.49
# nats short of a Laplace-preconditioned refit's ELBO, read 0.15-0.23 ± 0.01-0.03 (0.13-0.29 ±
# 0.1 from one run's 256 draws: not flagged at 0.25 and 3 standard errors). An open verdict
# (above the limit, within 3 standard errors) is settled on up to _SPREAD_RUNS check runs'
# draws pooled (``_finish``).
# Above d = 32 one check run's 256 draws are too few, so runs are pooled up to 8 draws per
# dimension, up to d = 64 (2 runs). There, a default full-rank fit of a correlated Student-t
# product (df 4, d = 64) converged reading 0.78-0.89 ± 0.02 (the same at 4,096 draws), and was
# that short: 20,000-step runs from it at Adam 3e-3 then 1e-3 (16 draws) gained 0.44 and then
# 0.33 nats of ELBO while it read 0.44 and 0.12. At d = 48-64 a logistic regression (N=1000)
# read 0.001-0.005, the mean-field fits of that Student-t 0.011-0.024. Full-rank fits go on to
# d = 127 (4 runs; as far as the check's memory budget holds all 256 draws' gradients, d² + 2d
# each, in one batch): at d = 96 that Student-t's default fits read 1.6-1.75 nats short.
# Mean-field fits stop at d = 64: each of their check runs also takes the mean gap's Hessian.
SPREAD_GAP_LIMIT = 0.1
_SPREAD_DRAWS_PER_DIM = 8
_SPREAD_MAX_DIM = 64
_SPREAD_MAX_DIM_FULL = 127
_SPREAD_RUNS = 8


def _has_spread_gap(family, dim):
    """Whether the check computes ``_spread_gap``'s draws: FullRank q with
    d <= ``_SPREAD_MAX_DIM_FULL``, MeanField and LowRank q with d <= ``_SPREAD_MAX_DIM`` (the
    least-squares fit to the draws needs many more draws than dimensions: ``_spread_runs``;
    LowRank's draws are the mean gap's, so only where that is computed)."""
    if isinstance(family, FullRank):
        return dim <= _SPREAD_MAX_DIM_FULL
    return isinstance(family, (MeanField, LowRank)) and dim <= _SPREAD_MAX_DIM


def _spread_runs(dim):
    """Check runs whose draws are pooled for the spread gap at least: 8 draws per dimension."""
    return -(-_SPREAD_DRAWS_PER_DIM * dim // _CHECK_DRAWS)


def _spread_gap(gw, eps, full, candidate=None, projected_noise=None):
    """``Estimate`` (nats) of the ELBO that moving q's spread to its optimum would gain, q's
    mean held, from the stationarity check's draws ``eps`` ``(..., n, dim)`` and the target's
    gradients there whitened by q's scale ``L``, ``gw = Lᵀ∇log p̃(μ + Lε)``
    (``_stationarity(..., with_draws=True)``; ``L = diag(σ)`` for mean-field, ``full`` False):
    ``½ Σ (λ − 1 − log λ)`` over the eigenvalues λ of ``M = E_q[Lᵀ H(z) L]``
    (``H = −∇²log p̃``), or over its diagonal for mean-field. At the family's optimum ``M = I``
    exactly, for any target (the ELBO's stationarity in ``L``: ``(LLᵀ)⁻¹ = E_q[H]``, Opper &
    Archambeau 2009); for a Gaussian target the gap is exact.

    ``M`` comes from the gradients by Stein's identity, ``E[gw εᵀ] = −M``, estimated as the
    least-squares fit of ``gw`` to the draws (``gw ≈ a − M̂ε``, which uses ``E[εεᵀ] = I``
    exactly): no noise at all on a Gaussian target. The estimate is debiased by its noise's
    expected contribution (``¼ Σ var(M̂_ij)``, the least-squares coefficients' variances from
    the fit's residuals), and ``stderr`` is the delta method's, to second order (its ratio to
    the estimate's spread over keys measured 0.66-1.06 in review). NaN where ``M`` is not
    positive definite or a gradient is not finite (no verdict).

    ``candidate`` (with ``full``): a function of ``M`` ``(..., dim, dim)`` giving the spread
    to move to, ``B`` (q's covariance whitened by ``L``), where the family's optimum is not
    ``M⁻¹`` (``_lowrank_spread_gap``); the gap is then ``½ (tr(M (I − B)) + log|B|)``, zero
    for ``B = I``. ``projected_noise`` (with it): a function of ``M`` and the noise's variances
    ``v`` (both ``(..., dim, dim)``) giving ``4×`` the noise's part along the directions the
    family can move ``B`` in, ``¼ E‖P_T(M̂ − M)‖²`` (``_projected_noise``: the plug-in gap's
    bias to second order, since a family cannot fit the noise off its own directions), which
    is the noise debiased then. Debiasing all ``dim²`` directions read
    −0.97 ± 0.44 for a rank-2 logistic fit (d = 32) 0.30 nats short (found in review).

    Computed on the host, in float64 NumPy, from the check's draws and gradients (a few d × d
    products and factorizations): in the compiled check they added 0.08 s to its compilation
    and 0.03 s to its lowering, which a first fit waits for (0.1 s of its 2.1-2.2 s whole
    process, measured), and two more LAPACK calls to order (``_compile.after``).
    """
    gw, eps = np.asarray(gw, np.float64), np.asarray(eps, np.float64)
    n, dim = eps.shape[-2:]
    # A gradient that overflowed at some draw (float32 exp in a Poisson GP, found on
    # posteriordb's gp_pois_regr), or so large that the algebra below overflows, leaves the
    # least-squares fit non-finite: no verdict, as the stationarity gives then (NaN), and not
    # LAPACK's error on a NaN matrix. Per problem.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        gc = gw - gw.mean(-2, keepdims=True)
        ec = eps - eps.mean(-2, keepdims=True)
        ect = np.swapaxes(ec, -1, -2)
        gram = ect @ ec
        coef = np.linalg.solve(gram, ect @ gc)  # gc ≈ ec @ coef
        resid = gc - ec @ coef
        # var(coef_ij) = [(EcᵀEc)⁻¹]_ii r_j (r_j output j's residual variance); M̂_ij averages
        # coef_ij and coef_ji (independent but on the diagonal, where both are coef_ii).
        r_var = np.sum(np.square(resid), -2) / (n - dim - 1)
        finite = np.all(np.isfinite(coef), (-2, -1)) & np.all(np.isfinite(r_var), -1)
        coef = np.where(finite[..., None, None], coef, 0.0)
        resid = np.where(finite[..., None, None], resid, 0.0)
        r_var = np.where(finite[..., None], r_var, 0.0)
        m = -0.5 * (coef + np.swapaxes(coef, -1, -2))
        s_in = np.diagonal(np.linalg.inv(gram), axis1=-2, axis2=-1)
        vc = s_in[..., :, None] * r_var[..., None, :]
        v = 0.25 * (vc + np.swapaxes(vc, -1, -2))
        v = v + v * np.eye(dim)  # the diagonal's variance is coef_ii's own, not half of it
        if full:
            lam = np.linalg.eigvalsh(m)
            ok = np.all(lam > 0, -1)
            eye = np.eye(dim)
            if candidate is None:
                lam = np.where(ok[..., None], lam, 1.0)
                gap = 0.5 * np.sum(lam - 1 - np.log(lam), -1)
                inv = np.linalg.inv(np.where(ok[..., None, None], m, eye))
                b = 0.5 * (eye - inv)
            else:
                spread = candidate(np.where(ok[..., None, None], m, eye))
                _, logdet = np.linalg.slogdet(spread)
                gap = 0.5 * (np.trace(m, axis1=-2, axis2=-1) - np.sum(m * spread, (-2, -1))
                             + logdet)
                b = 0.5 * (eye - spread)
        else:
            d = np.diagonal(m, axis1=-2, axis2=-1)
            v = np.diagonal(v, axis1=-2, axis2=-1)
            ok = np.all(d > 0, -1)
            d = np.where(ok[..., None], d, 1.0)
            gap = 0.5 * np.sum(d - 1 - np.log(d), -1)
            b = np.einsum("...i,ij->...ij", 0.5 * (1 - 1 / d), np.eye(dim))
        # The noise's own part, ¼‖ξ‖² for noise ξ in M̂ (a quadratic form of Gaussian noise:
        # mean ¼ tr, variance ⅛ tr of the square; ξ is symmetric, so an off-diagonal pair of
        # entries counts twice in ‖ξ‖² and four times in its variance).
        if projected_noise is None:
            noise = 0.25 * np.sum(v, (-2, -1) if full else -1)
            if full:
                second = 0.125 * (2.0 * np.sum(np.square(v), (-2, -1))
                                  - np.sum(np.square(np.diagonal(v, axis1=-2, axis2=-1)), -1))
            else:  # (v is the diagonal's alone here)
                second = 0.125 * np.sum(np.square(v), -1)
        else:
            mean4, sq = projected_noise(np.where(ok[..., None, None], m, eye), v)
            noise, second = 0.25 * mean4, 0.125 * sq
        # First order: M̂ − M = −sym(Ecᵀ R)/n; its contraction with b is −Σ_k r_kᵀ b ε_k / n.
        t = np.sum((resid @ b) * ec, -1)
        var = np.var(t, -1, ddof=1) / n + second
    ok = ok & finite
    return Estimate(np.where(ok, gap - noise, np.nan), np.where(ok, np.sqrt(var), np.nan))


def _projected_noise(grams, curvature, v):
    """The plug-in gap's bias to second order, ``4×``, for one problem, and ``8×`` its variance:
    ``tr(S W)`` and ``tr((S W)²)``, ``S = (G − K)⁺``, ``W = Aᵀ diag(w) A``, for symmetric noise
    ``ξ`` (``Aᵀξ`` has covariance ``W``) whose entries ``i <= j`` are
    independent with variances ``v`` ``(dim, dim)`` (``w = 2v`` off the diagonal, ``v`` on
    it), ``A`` the ``k`` flattened directions ``(dim², k)`` the family moves ``B`` in at
    ``B = I`` (``∂B/∂θ``), ``G = AᵀA``, and ``K`` (``curvature``, ``(k, k)``) the
    second-order term ``tr((I − M) ∂²B/∂θ²)`` of a curved family. ``grams(wt)``: ``Aᵀ diag(wt)
    A`` for a symmetric weight matrix ``wt`` ``(dim, dim)`` (``_lowrank_grams``; ``A`` itself,
    ``dim²·k`` numbers, is never formed). From ``f(M) = max_θ φ(M, θ)``: the gain the search
    makes of ``ξ`` is ``½ gᵀ(−∂²φ)⁻¹g``, ``g = −½ Aᵀξ``, ``−∂²φ = ½ (G − K)``. Directions
    where ``G − K`` is not positive (a factor's rotations, which repeat; or a noisy ``M`` not
    at the family's optimum) are left out."""
    dim = v.shape[-1]
    hess = grams(np.ones((dim, dim))) - curvature
    hess = 0.5 * (hess + hess.T)
    # ξ is symmetric: ⟨A_s, ξ⟩ counts each off-diagonal pair twice, so its entries weigh
    # 2 v_ij (v_ii on the diagonal); with a basis of all symmetric matrices this is Σ v.
    weighted = grams(2.0 * v - v * np.eye(dim))
    lam, vecs = np.linalg.eigh(hess)
    keep = lam > 1e-10 * np.max(np.abs(lam))
    inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
    proj = vecs.T @ weighted @ vecs
    return np.sum(inv * np.diagonal(proj)), np.sum(inv[:, None] * inv[None, :] * proj**2)


def _lowrank_grams(lo_inv, w, wt):
    """``Aᵀ diag(wt) A`` (``_projected_noise``) for ``C = WWᵀ + diag D`` whitened by ``lo``
    (one problem: ``lo_inv`` ``(dim, dim)``, ``w`` ``(dim, rank)``), ``A``'s columns the
    directions ``B`` moves in: ``u_i u_iᵀ`` (each ``D_i``), then ``x_j u_aᵀ + u_a x_jᵀ`` (each
    ``W_aj``, ``j`` major), ``u_i = lo⁻¹ e_i``, ``x_j = lo⁻¹ w_j``. In closed form, each
    block a sum over ``wt``'s entries of products of those vectors (``wt`` symmetric):
    O(d⁴ + r²d³) work and O(d³) memory where forming ``A`` took ``dim²·dim·(1 + rank)``
    numbers (151 MB at d = 64, rank 8, 8 problems) and O(r²d⁵) work."""
    dim, rank = w.shape
    u = lo_inv.T  # row i: u_i
    x = (lo_inv @ w).T  # row j: x_j
    uu = u[:, None, :] * u[None, :, :]  # [i, i', k] = u_i[k] u_i'[k]
    diag = np.sum((uu @ wt) * uu, -1)
    ux = u[:, None, :] * x[None, :, :]  # [i, j, k] = u_i[k] x_j[k]
    ux_w = ux @ wt
    cross = 2.0 * ((ux_w * u[:, None, :]) @ u.T)  # [i, j, a]
    xx = x[:, None, :] * x[None, :, :]  # [j, m, k]
    t1 = ((xx @ wt).reshape(rank * rank, dim) @ uu.reshape(dim * dim, dim).T)
    t1 = t1.reshape(rank, rank, dim, dim).transpose(0, 2, 1, 3)  # [j, a, m, b]
    t2 = (ux_w.reshape(dim * rank, dim) @ ux.reshape(dim * rank, dim).T)
    t2 = t2.reshape(dim, rank, dim, rank).transpose(1, 2, 3, 0)  # [b, j, a, m] → [j, a, m, b]
    factor = 2.0 * (t1 + t2).reshape(rank * dim, rank * dim)
    cross = cross.reshape(dim, rank * dim)
    return np.block([[diag, cross], [cross.T, factor]])


def _lowrank_projected_noise(m, v, lo_inv, w):
    """``_projected_noise``'s pair of a ``LowRank`` q, problem by problem (``m``, ``v``:
    ``(..., dim, dim)``; ``lo_inv``, ``w`` as in ``_lowrank_spread_gap_batch``). ``K``: the
    only second derivatives are ``∂²C/∂W_aj∂W_bj = e_a e_bᵀ + e_b e_aᵀ``, so
    ``K = I_rank ⊗ 2 (C⁻¹ − H)`` on the factor's block, ``H = lo⁻ᵀ M lo⁻¹``."""
    dim, rank = w.shape[-2:]
    mean, sq = np.empty(m.shape[:-2]), np.empty(m.shape[:-2])
    for i in np.ndindex(*m.shape[:-2]):
        bend = 2.0 * (lo_inv[i].T @ (np.eye(dim) - m[i]) @ lo_inv[i])
        curvature = np.zeros((dim * (1 + rank),) * 2)
        curvature[dim:, dim:] = np.kron(np.eye(rank), bend)  # one block per factor column
        mean[i], sq[i] = _projected_noise(functools.partial(_lowrank_grams, lo_inv[i], w[i]),
                                          curvature, v[i])
    return mean, sq


def _lowrank_spread_gap(g, dz, params):
    """``_spread_gap`` of a ``LowRank`` q from the mean gap's draws ``dz = z − μ`` and the
    target's gradients ``g = ∇log p̃(z)`` there, both ``(..., n, dim)``: whitened on the host by
    ``L = chol(WWᵀ + D)`` (``ε = L⁻¹dz``, ``gw = Lᵀg``), with the family's best spread as the
    candidate (``_lowrank_best``): a low-rank q cannot reach ``M⁻¹``.

    The gap is a lower bound of the spread's shortfall under the quadratic model of the target
    that ``E_q[H]`` gives (the candidate is the best found, not provably the best); at the
    family's optimum ``E_q[H]`` meets the same stationarity conditions (``HW = C⁻¹W``,
    ``diag H = diag C⁻¹``) as that model's optimum, so the gap is zero there.

    NaN (no verdict) for a problem whose covariance is singular to float64 (LAPACK's
    LinAlgError: a diagonal 1e-18 of its largest, from ``init_params``, found in review)."""
    try:
        return _lowrank_spread_gap_batch(g, dz, params)
    except np.linalg.LinAlgError:
        batch = np.shape(params.log_diag)[:-1]
        if not batch:
            return Estimate(np.float64(np.nan), np.float64(np.nan))
    # One problem of a fit_many batch failed: the others keep their verdicts.
    g, dz = np.asarray(g), np.asarray(dz)
    params = jax.tree_util.tree_map(np.asarray, params)
    gaps, errs = np.full(batch, np.nan), np.full(batch, np.nan)
    for i in np.ndindex(*batch):
        try:
            one = _lowrank_spread_gap_batch(
                g[i], dz[i], jax.tree_util.tree_map(lambda x, i=i: x[i], params))
        except np.linalg.LinAlgError:
            continue
        gaps[i], errs[i] = one.mean, one.stderr
    return Estimate(gaps, errs)


def _lowrank_spread_gap_batch(g, dz, params):
    w = np.asarray(params.cov_factor, np.float64)
    d = np.exp(2.0 * np.asarray(params.log_diag, np.float64))
    cov = w @ np.swapaxes(w, -1, -2) + d[..., :, None] * np.eye(d.shape[-1])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lo = np.linalg.cholesky(cov)
        lo_inv = np.linalg.inv(lo)
        eps = np.asarray(dz, np.float64) @ np.swapaxes(lo_inv, -1, -2)
        gw = np.asarray(g, np.float64) @ lo
    return _spread_gap(gw, eps, True,
                       functools.partial(_lowrank_best, lo=lo, lo_inv=lo_inv, rank=w.shape[-1],
                                         diag0=d),
                       projected_noise=functools.partial(_lowrank_projected_noise,
                                                         lo_inv=lo_inv, w=w))


# Its search: alternating exact minimizations, W given D (eigenvectors, closed form) and D given
# W (Newton steps: the objective is convex in D), from q's own D and from the mean-field
# optimum 1/diag(H). Each sweep lowers the objective; 20 sweeps settle it (measured: d = 10-64,
# rank 1-8, the last 10 sweeps changed it by under 1e-6 nats).
_LOWRANK_SWEEPS = 20


def _lowrank_best(m, lo, lo_inv, rank, diag0):
    """The spread ``B`` (whitened by ``lo``) of the best low-rank-plus-diagonal covariance
    ``C = WWᵀ + diag D`` (``W`` ``(dim, rank)``) found for the quadratic model
    ``F(C) = ½ tr(H C) − ½ log|C|``, ``H = lo⁻ᵀ m lo⁻¹`` (``m``: ``(..., dim, dim)``, positive
    definite), searched from q's own ``D = diag0`` and from ``1/diag H``: q's own covariance
    (``B = I``) unless the search beats it."""
    h = np.swapaxes(lo_inv, -1, -2) @ m @ lo_inv
    h = 0.5 * (h + np.swapaxes(h, -1, -2))
    hd = np.diagonal(h, axis1=-2, axis2=-1)
    current = lo @ np.swapaxes(lo, -1, -2)
    best, f_best = current, _quadratic_model(h, current)
    for diag in (diag0, 1.0 / hd):
        for _ in range(_LOWRANK_SWEEPS):
            w = _best_factor(h, diag, rank)
            diag = _best_diag(h, w, diag)
        cov = w @ np.swapaxes(w, -1, -2) + diag[..., :, None] * np.eye(diag.shape[-1])
        f = _quadratic_model(h, cov)
        better = f < f_best
        best = np.where(better[..., None, None], cov, best)
        f_best = np.where(better, f, f_best)
    return lo_inv @ best @ np.swapaxes(lo_inv, -1, -2)


def _quadratic_model(h, cov):
    """``½ tr(H C) − ½ log|C|`` (inf where ``C`` is not positive definite)."""
    sign, logdet = np.linalg.slogdet(cov)
    f = 0.5 * (np.sum(h * cov, (-2, -1)) - logdet)
    return np.where(sign > 0, f, np.inf)


def _best_factor(h, diag, rank):
    """The ``W`` minimizing ``_quadratic_model`` for ``D = diag``: in ``y = D^-½ z`` the
    eigenvectors of the ``rank`` smallest eigenvalues ``μ`` of ``D^½ H D^½``, scaled so that
    ``C`` is ``1/μ`` along each (zero where ``μ >= 1``)."""
    sd = np.sqrt(diag)
    mu, vecs = np.linalg.eigh(sd[..., :, None] * h * sd[..., None, :])
    mu = np.maximum(mu[..., :rank], np.finfo(np.float64).tiny)
    return sd[..., :, None] * vecs[..., :rank] * np.sqrt(np.maximum(1.0 / mu - 1.0, 0.0))[
        ..., None, :]


def _best_diag(h, w, diag, steps=3):
    """Newton steps on ``D`` for ``_quadratic_model`` with ``W = w`` (convex in ``D``: gradient
    ``½ (diag H − diag C⁻¹)``, Hessian ``½ C⁻¹ ∘ C⁻¹``), each halved until ``D`` stays positive
    and the objective does not rise (else kept where it was)."""
    eye = np.eye(diag.shape[-1])
    hd = np.diagonal(h, axis1=-2, axis2=-1)
    wwt = w @ np.swapaxes(w, -1, -2)
    for _ in range(steps):
        cov = wwt + diag[..., :, None] * eye
        f0 = _quadratic_model(h, cov)
        prec = np.linalg.inv(cov)
        grad = 0.5 * (hd - np.diagonal(prec, axis1=-2, axis2=-1))
        step = np.linalg.solve(0.5 * np.square(prec), grad[..., None])[..., 0]
        t = np.ones_like(f0)
        done = np.zeros(f0.shape, bool)
        new = diag
        for _ in range(30):
            trial = diag - t[..., None] * step
            ok = np.all(trial > 0, -1)
            f = np.where(ok, _quadratic_model(h, wwt + np.where(ok[..., None], trial, diag)[
                ..., :, None] * eye), np.inf)
            take = ~done & (f <= f0)
            new = np.where(take[..., None], trial, new)
            done = done | take
            if np.all(done):
                break
            t = np.where(done, t, 0.5 * t)
        diag = new
    return diag


# The mean's polish (``_polish``): antithetic pairs of draws, and its Newton steps' stopping
# rule (the decrement, in nats, and a cap).
_POLISH_PAIRS = 128
_POLISH_TOL = 1e-3
_POLISH_STEPS = 8


def _polish_fn(family):
    """``polish(key, params, target) -> (params, steps)``: q's mean moved towards its optimum by
    Newton steps, q's spread held (MeanField and LowRank, when ``_mean_gap`` flags the mean).

    The steps maximize ``f(μ) = mean_i ½ [log p̃(μ + o_i) + log p̃(μ − o_i)]`` (the ELBO's part
    that depends on the mean, with fixed antithetic draws ``o_i`` of q centred), with the
    Hessian of ``log p̃`` at ``μ`` standing in for ``f``'s, each step the first of 1, 1/2, ...
    that raises ``f`` (``preconditioning._newton``). On a Gaussian target the pairs cancel the
    draws' error exactly (``f`` is the ELBO's mean part up to a constant) and one step lands on
    the optimum; on others the fixed draws bias the optimum by ``O(1/√n)`` of the draws' own
    noise only in the target's non-quadratic part. Adam cannot do this on a ridge: its steps
    are per coordinate, and their noise keeps the mean wandering along the flat direction (a
    diagonal-whitened refit that started at the exact optimum of a d = N = 200 regression
    ended 0.28 nats short, measured).
    """

    def polish(key, params, target):
        from vi_engine import preconditioning as lp

        loc = params.loc
        half = family.sample(key, params, _POLISH_PAIRS) - loc
        offsets = jnp.concatenate([half, -half])

        def neg(mu):
            return -jnp.mean(jax.vmap(target.log_density)(mu + offsets))

        def hessian(mu):
            return -jax.hessian(target.log_density)(mu)

        mu, _, _, _, steps = lp._newton(neg, loc, _POLISH_TOL, hessian, _POLISH_STEPS)
        return params._replace(loc=mu), steps

    return polish


@functools.lru_cache(maxsize=64)
def _compiled_polish(family, batched=False):
    polish = _polish_fn(family)
    if not batched:
        return jax.jit(polish)
    # One problem after another (lax.map), not vmap: vmapped, the Newton loop runs two
    # independent batched Cholesky factorizations per iteration (the step's and the stopping
    # test's), and jaxlib 0.10.2's batched LAPACK kernels deadlock when two run at once on
    # XLA's CPU thread pool (each waits for chunks it queued on the pool the other holds). Two
    # d = N = 200 problems hung in 3-5 of 6 processes that way; a polish is rare and cheap.
    return jax.jit(lambda keys, params, targets: jax.lax.map(
        lambda args: polish(*args), (keys, params, targets)))


def _polish(res, key, num_elbo_samples):
    """``res`` with its mean polished (``_polish_fn``) when ``mean_gap`` flags it, and its
    posterior, checks and ELBO estimate redone there; ``res`` itself when the polish does not
    lower the mean gap (measured on fresh draws) or lowers the ELBO (by 3 standard errors)."""
    if not _gap_flags(res.mean_gap):
        return res
    family, target = res.family, res.target
    k_polish, k_final = jax.random.split(key)
    program = _executable(_compiled_polish(family), ("polish", family), k_polish, res.params,
                          target, effort=_compile.ONCE)
    params, steps = program.result()(k_polish, res.params, target)
    steps = int(steps)
    if steps == 0 or not all(np.isfinite(x).all() for x in jax.device_get(
            jax.tree_util.tree_leaves(params))):
        return res
    final = _final_executables(family, num_elbo_samples, False, k_final, params, target)
    estimate, parts, stationarity, gap, spread = _finish(final, k_final, params, target)
    old = res.mean_gap
    if not gap.mean < old.mean:  # NaN (no verdict at the new mean) keeps the old
        return res
    e1 = estimate()
    if not _not_lower(res.elbo, e1):
        return res
    message = (f"{res.message}; then q's mean took {steps} Newton step{'s' * (steps > 1)} to "
               f"its optimum, its spread held (mean_gap {old.mean:.3g} -> {gap.mean:.2g} "
               "nats)")
    return dataclasses.replace(res, posterior=_posterior(parts), params=params, _elbo=e1,
                               stationarity=stationarity, mean_gap=gap, spread_gap=spread,
                               message=message)


def _polish_many(family, key, params, targets, flagged, estimate, stationarity, gap, spread,
                 num_elbo_samples):
    """``fit_many``'s ``_polish``: the problems ``flagged`` (a ``(B,)`` mask) polished, each kept
    where its mean gap drops (fresh draws) and its ELBO does not (by 3 standard errors).
    Returns ``(params, estimate, posterior parts, stationarity, mean gap, spread gap, kept)``:
    ``kept`` is the mask of the problems polished, ``estimate`` an ``Estimate`` (both sides' are
    computed), and every other problem keeps its values."""
    batch = flagged.shape[0]
    k_polish, k_final = jax.random.split(key)
    keys, k_finals = jax.random.split(k_polish, batch), jax.random.split(k_final, batch)
    program = _executable(_compiled_polish(family, True), ("polish", family, True), keys,
                          params, targets, effort=_compile.ONCE)
    new, steps = program.result()(keys, params, targets)
    finite = functools.reduce(np.logical_and, (
        np.all(np.isfinite(np.asarray(x)).reshape(batch, -1), 1)
        for x in jax.tree_util.tree_leaves(new)))
    moved = flagged & (np.asarray(steps) > 0) & finite
    candidate = _where_problems(moved, new, params)
    final = _final_executables(family, num_elbo_samples, True, k_finals, candidate, targets)
    estimate2, _, stationarity2, gap2, spread2 = _finish(final, k_finals, candidate, targets)
    e0, e1 = estimate(), estimate2()
    kept = moved & (gap2.mean < gap.mean) & _not_lower(e0, e1)
    params = _where_problems(kept, candidate, params)

    def pick(a, b):
        if b is None:
            return None
        return Estimate(*(np.where(kept, x, y) for x, y in zip(a, b, strict=True)))

    return (params, pick(e1, e0), final[0].result()(params),
            np.where(kept, stationarity2, stationarity), pick(gap2, gap), pick(spread2, spread),
            kept)


def _where_problems(mask, a, b):
    """Per problem (the leading axis of every leaf): ``a`` where the host mask ``mask``, else
    ``b``; selected on the host (an eager ``jnp.where`` compiles a program per leaf shape)."""
    a, b = jax.device_get((a, b))
    return jax.tree_util.tree_map(
        lambda x, y: jnp.asarray(np.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y)),
        a, b)


def _not_lower(e0, e1):
    """Whether (per problem) the ``Estimate`` ``e1`` of an ELBO is not lower than ``e0`` by more
    than three standard errors of their difference: how a polish or a refit is accepted."""
    m0, s0, m1, s1 = (np.asarray(x, np.float64) for x in (*e0, *e1))
    return m1 >= m0 - 3 * np.sqrt(np.square(s0) + np.square(s1))


def _gap_flags(gap, limit=None):
    """Where a ``_mean_gap`` (or ``_spread_gap``, with ``SPREAD_GAP_LIMIT``) estimate says the
    mean (or spread) stopped short: above the limit (``MEAN_GAP_LIMIT`` by default) and three
    standard errors."""
    if gap is None:
        return np.False_  # a NumPy bool: ``~`` negates it (``~False`` is -1, a row index)
    limit = MEAN_GAP_LIMIT if limit is None else limit
    mean, se = np.asarray(gap.mean), np.asarray(gap.stderr)
    return (mean > limit) & (mean > 3 * se)


def _spread_flags(spread):
    """``_gap_flags`` of a ``_spread_gap`` estimate."""
    return _gap_flags(spread, SPREAD_GAP_LIMIT)


def _gap_open(spread):
    """Where a ``_spread_gap`` estimate is above its limit but within three standard errors of
    zero: no verdict yet (``_finish`` adds draws)."""
    if spread is None:
        return np.False_
    mean = np.asarray(spread.mean)
    return (mean > SPREAD_GAP_LIMIT) & ~_spread_flags(spread)


def _checks(cfg):
    """The stationarity check tests the ELBO's gradient: not what IWAE or Rényi fits zero (a
    correct mean-field IWAE fit read 9-10, measured in review)."""
    return isinstance(cfg.objective, ELBO)


def _check_fn(family, batched):
    """``check(key, params, target, run=None) -> (stationarity, mean gap or None, draws or
    None)``: the draws are ``_spread_gap``'s inputs ``(gw, eps)``, which ``_finish`` computes
    on the host. ``run``: ``_finish``'s run number, folded into the key here (an eager
    ``fold_in`` compiled a program of its own: 0.1 s of a first fit, found in review)."""

    def check(key, params, target, run=None, budget=None):
        if run is not None:
            key = jax.random.fold_in(key, run)
        stationarity, pair = _stationarity(key, family, params, target, budget, True)
        gap = None
        if not _has_spread_gap(family, target.dim):
            pair = None
        if _has_mean_gap(family, target.dim, budget):
            # After the stationarity, not beside it: each evaluates the target over a batch of
            # draws (``_compile.after``).
            after = params._replace(loc=_compile.after(params.loc, stationarity))
            gap, draws = _mean_gap(key, family, after, target, True)
            if isinstance(family, LowRank) and _has_spread_gap(family, target.dim):
                pair = draws
        return stationarity, gap, pair

    if not batched:
        return check

    def many(keys, params, targets, run=None):
        if run is not None:
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, run)
        # The memory budget is the program's: shared by the problems side by side.
        budget = max(1, _CHECK_BUDGET // keys.shape[0])
        stationarity, pair = jax.vmap(
            lambda k, p, t: _stationarity(k, family, p, t, budget, True))(keys, params, targets)
        gap = None
        if not _has_spread_gap(family, targets.dim):
            pair = None
        # One problem after another (lax.map): vmapped over the problems, the Hessian of a
        # target that factors a matrix runs independent batched factorizations and solves (its
        # primal's and its tangents'), which can deadlock (``_compile.after``; 2 of 4 fit_many
        # runs of two 120-point GPs hung, found in review).
        if _has_mean_gap(family, targets.dim, budget):
            after = params._replace(loc=_compile.after(params.loc, stationarity))
            gap, draws = jax.lax.map(lambda a: _mean_gap(a[0], family, a[1], a[2], True),
                                     (keys, after, targets))
            if isinstance(family, LowRank) and _has_spread_gap(family, targets.dim):
                pair = draws
        return stationarity, gap, pair

    return many


# numpyro computes these on first access, eagerly: for a full-rank posterior the covariance
# was one more small program to compile (0.1 s, measured). Computed in the posterior program,
# for MultivariateNormal only: it already holds a d x d factor, whereas a low-rank posterior's
# covariance would be O(d^2) memory for O(d * rank) parameters.
def _lazy_moments(posterior):
    if type(posterior) is not dist.MultivariateNormal:
        return {}
    return {"covariance_matrix": posterior.covariance_matrix}


def _posterior(parts):
    """The posterior from ``(distribution, precomputed lazy moments)``."""
    posterior, moments = parts
    for name, value in moments.items():
        setattr(posterior, name, value)  # how numpyro's lazy_property caches its value
    return posterior


@functools.lru_cache(maxsize=64)
def _compiled_setup(family, optimizer, dim, dtype, batch):
    return jax.jit(_setup_fn(family, optimizer, dim, dtype, batch))


@functools.lru_cache(maxsize=64)
def _compiled_final(family):
    return jax.jit(_final_fn(family))


@functools.lru_cache(maxsize=64)
def _compiled_estimate(family, num_samples, batched):
    return jax.jit(_estimate_fn(family, num_samples, batched))


@functools.lru_cache(maxsize=64)
def _compiled_check(family, batched):
    return jax.jit(_check_fn(family, batched))


@functools.lru_cache(maxsize=64)
def _compiled_fixed(cfg: _Config, batch, dim, dtype):
    """Setup and all steps as one executable (``tol=None``, no progress bar): one compilation
    and one dispatch, so a short fit costs what a hand-written ``lax.scan`` costs. The posterior
    and the final ELBO are the programs of the window path (``_final_executables``): in here
    they would count in XLA's flops, by which the compile effort is chosen (the ELBO's 1000
    draws, a full-rank covariance's 2 d^3), and a posterior program depends on the parameters'
    shapes only, so every fit of a family shares it."""
    setup = _setup_fn(cfg.family, cfg.optimizer, dim, dtype, batch)
    run = _make_window(cfg, skip_when_done=False)
    if batch is not None:
        run = _over_problems(run)

    def program(key, target, init_params, tol, max_steps):
        state, k_run, k_final = setup(key, init_params)
        state, losses = run(state, k_run, target, tol, max_steps)
        # Only what the result needs: every output buffer costs dispatch time on each call.
        # (A rolled-back run restarts from the setup state, which ``fit`` can rebuild.)
        info = (state.step, state.status, state.bad_step)
        return state.params, info, losses, k_final

    return jax.jit(program)


# Ahead-of-time compiled executables, by signature. On the path that runs until convergence,
# three programs are needed. One worker thread compiles them in turn: the window first (lowered
# from the setup's output shapes, so the longest compilation starts at once), then the setup and
# the posterior, which this thread lowers meanwhile (measured: 0.2 s earlier than compiling the
# setup first), with the final ELBO (lowered and compiled when first read: ``_Deferred``).
# Measured on 2 cores: compiling them concurrently is slower (XLA's compiler already keeps both
# cores busy: the window took 2.7 s instead of 1.7 s). Tracing and lowering happen on the
# calling thread (the final ELBO's lowering under the settings it was traced with): JAX's
# context managers (enable_x64, matmul precision, ...) are thread-local, and
# numpyro's handler stack is a global list. Threads share the cache: one lowers and compiles a
# signature, the others wait for its future (``_EXECUTABLES_LOCK`` covers lookup and lowering,
# not compilation, nor the final ELBO's deferred lowering, which ``_Deferred``'s own lock
# covers).
_EXECUTABLES: dict = {}
_EXECUTABLES_LOCK = threading.RLock()
_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vi-compile")


def _signature(tag, args):
    leaves, treedef = jax.tree_util.tree_flatten(args)
    # Settings that change the compiled program without changing any input's dtype or shape.
    settings = (
        jax.config.jax_default_matmul_precision,
        jax.config.jax_threefry_partitionable,
        jax.config.jax_numpy_dtype_promotion,
        jax.config.jax_default_device,
        jax.default_backend(),
    )
    return tag, settings, treedef, tuple(map(_leaf_signature, leaves))


def _leaf_signature(x):
    # The dtype object, not its name: str(dtype) was most of a signature's cost (20 -> 4.7 us).
    dtype = getattr(x, "dtype", None)
    if dtype is None:  # a Python scalar
        return (), type(x)
    return tuple(x.shape), dtype


class _Deferred:
    """A traced program lowered and compiled on the first ``result()`` (once, thread-safe): for
    programs a caller may never run, such as the final ELBO estimate of a fit whose ``elbo`` is
    not read. It was traced when created, under the caller's JAX configuration; lowering
    reads two settings again, so it restores them: x64 (lowering rules that re-trace in Python,
    threefry's for one, fail on a jaxpr traced with the other) and the default device (which
    device the program runs on); matmul precision and threefry's partitionability, fixed at
    trace time on jax 0.10, are restored too in case a later JAX reads them there. Lowering it at
    once was on a first fit's critical path (0.05-0.09 s on one thread; measured whole process
    1.49 -> 1.46 s in-process over 12 interleaved rounds)."""

    def __init__(self, traced, effort):
        self._traced, self._effort = traced, effort
        self._settings = (
            jax.config.jax_enable_x64,
            jax.config.jax_default_device,
            jax.config.jax_threefry_partitionable,
            jax.config.jax_default_matmul_precision,
        )
        self._executable = None
        self._lock = threading.Lock()

    def result(self):
        with self._lock:
            if self._executable is None:  # a failed compilation raises and is retried next time
                x64, device, partitionable, precision = self._settings
                with (jax.enable_x64(x64), jax.default_device(device),
                      jax.threefry_partitionable(partitionable),
                      jax.default_matmul_precision(precision), _compile.gc_paused()):
                    lowered = self._traced.lower()
                    effort = self._effort
                    if not isinstance(effort, str):  # (its estimate reads threefry's setting)
                        effort = _compile.choose(lowered, effort, self._traced.jaxpr)
                self._executable = _compile.compile_lowered(lowered, effort)
                self._traced = None
            return self._executable

    def done(self):
        return True

    def exception(self):
        return None


def _executable(jitted, tag, *args, effort, compile_there=False):
    """A future of ``jitted`` compiled for the shapes of ``args``, cached by signature.

    Tracing and lowering happen in this thread (see ``_EXECUTABLES``). ``compile_there``:
    ``False`` compiles now, ``True`` on the worker thread, ``"deferred"`` lowers and compiles
    on first use (see ``_Deferred``). ``effort``: see ``_compile.compile_lowered``; the effort
    it resolves to is kept as the future's ``effort`` (a NaN replay compiles with the same;
    a deferred program keeps the tiers, resolved when it compiles).
    """
    sig = _signature(tag, args)
    compile_here = None
    with _EXECUTABLES_LOCK:
        hit = _EXECUTABLES.get(sig)
        if hit is not None and hit.done() and hit.exception() is not None:
            hit = None  # a failed compilation is raised once, not cached
        if hit is None:
            if len(_EXECUTABLES) > 256:
                _EXECUTABLES.clear()
            if compile_there == "deferred":  # nothing lowered yet: tiers resolve when compiled
                with _compile.gc_paused():
                    future = _Deferred(jitted.trace(*args), effort)
            else:
                with _compile.gc_paused():
                    traced = jitted.trace(*args)
                    lowered = traced.lower()
                if not isinstance(effort, str):
                    effort = _compile.choose(lowered, effort, traced.jaxpr)
                if compile_there:
                    future = _COMPILER.submit(_compile.compile_lowered, lowered, effort)
                else:  # compiled below, outside the lock; other threads wait on the future
                    future = compile_here = concurrent.futures.Future()
            future.effort = effort
            hit = _EXECUTABLES[sig] = future
    if compile_here is not None:
        try:
            compile_here.set_result(_compile.compile_lowered(lowered, effort))
        except BaseException as err:
            compile_here.set_exception(err)
            raise
    return hit


def _final_executables(family, num_samples, batched, key, params, target, compile_there=False,
                       check=True):
    """Futures of the compiled posterior (built in compiled code, see ``_final_fn``), of the
    final ELBO estimate and of the check (``_check_fn``: the stationarity and, for mean-field
    and low-rank q, the mean gap; both ``None`` with ``num_samples=0``). The check runs at the
    end of every fit: 2 ms on a warm linear regression (N=500, d=20, full-rank), but 0.1-0.15 s
    more for a first fit in a fresh process on 2 cores (its tracing, lowering and compiling
    compete with the window's compilation; 0.24 s, 1.83 -> 2.07 s over 7 interleaved rounds,
    before its gradients were closed-form; compiling it on a second thread beside the window's
    was no faster).

    The estimate is a separate program, compiled when ``FitResult.elbo`` is first read: its
    compilation (0.11-0.15 s for a linear regression) was the last thing a first fit waited
    for, and a caller who only wants the posterior never pays for it. It is traced now, so it
    sees the JAX configuration of the fit (x64, matmul precision) wherever it is read, and
    lowered then (``_Deferred``).
    """
    posterior = _executable(
        _compiled_final(family), ("final", family), params,
        effort=_compile.ONCE, compile_there=compile_there,
    )
    if num_samples == 0:
        return posterior, None, None
    if check:
        check = _executable(
            _compiled_check(family, batched), ("check", family, batched),
            key, params, target, np.int32(1), effort=_CHECK_TIERS, compile_there=compile_there,
        )
    else:
        check = None
    estimate = _executable(
        _compiled_estimate(family, num_samples, batched), ("elbo", family, num_samples, batched),
        key, params, target, effort=_compile.ONCE, compile_there="deferred",
    )
    return posterior, estimate, check


def _finish(final, k_final, params, target):
    """``(estimate, posterior parts, stationarity, mean gap, spread gap)`` from
    ``_final_executables``' futures; the estimate is a ``_PendingEstimate`` (see
    ``FitResult.elbo``) or ``None``, the stationarity a host float (``fit``), a ``(B,)`` NumPy
    array (``fit_many``) or ``None``, the gaps ``Estimate``s of the same (``_mean_gap``,
    ``_spread_gap``) or ``None``."""
    posterior, estimate, check = final
    parts = posterior.result()(params)
    if estimate is None:
        return None, parts, None, None, None
    stationarity = gap = spread = None
    if check is not None:
        run = check.result()
        full = isinstance(params, FullRankParams)
        if isinstance(params, LowRankParams):
            host = jax.device_get(params)

            def spread_of(pair):
                return _lowrank_spread_gap(*pair, host)
        else:
            def spread_of(pair):
                return _spread_gap(*pair, full)
        # Run i draws with fold_in(k_final, i): one key per run.
        stationarity, gap, pair = jax.device_get(run(k_final, params, target, np.int32(1)))
        runs = 1

        def another():
            nonlocal runs
            runs += 1
            return jax.device_get(run(k_final, params, target, np.int32(runs)))

        while pair is not None and runs < _spread_runs(pair[1].shape[-1]):
            pair = _pooled(pair, another()[2])
        spread = None if pair is None else spread_of(pair)
        if (np.any(stationarity > STATIONARITY_LIMIT) or np.any(_gap_flags(gap))
                or np.any(_spread_flags(spread))):
            # Confirmed on fresh draws: a per-draw log-scale gradient is skewed (like 1 - ε²),
            # so a t-statistic's tail is heavier than normal; at the optimum one check passes 6
            # with probability ~2e-4 at d=20 and 1.7e-3 at d=200 (measured in review), two in
            # a row about its square, while a fit short of its optimum reads 66-853 twice.
            # The spread gap, an estimate from all the draws, is taken from all runs' pooled.
            again, gap2, pair2 = another()
            stationarity = np.minimum(stationarity, again)
            gap = _lower(gap, gap2)
            if pair is not None:
                pair = _pooled(pair, pair2)
                spread = spread_of(pair)
        # An open verdict (above the limit, within 3 standard errors) is settled on more draws:
        # further runs pooled, up to _SPREAD_RUNS, each problem's estimate kept once settled.
        still = _gap_open(spread)
        while np.any(still) and runs < _SPREAD_RUNS:
            pair = _pooled(pair, another()[2])
            pooled = spread_of(pair)
            # A run with a non-finite gradient leaves the verdict where it was (not NaN).
            took = still & np.isfinite(pooled.mean)
            spread = Estimate(*(np.where(took, a, b) for a, b in zip(pooled, spread,
                                                                      strict=True)))
            still = took & _gap_open(pooled)
        if np.ndim(stationarity) == 0:
            stationarity = float(stationarity)
            gap, spread = (None if e is None else Estimate(float(e.mean), float(e.stderr))
                           for e in (gap, spread))
    # On the device now: a NumPy leaf of the target would otherwise get its dtype from the x64
    # mode in force when .elbo is read (not the one the estimate was compiled for), and its
    # values then (a caller may have changed the array in place since).
    pending = _PendingEstimate(estimate, jax.device_put((k_final, params, target)))
    return pending, parts, stationarity, gap, spread


def _pooled(pair, more):
    """The spread gap's draws ``(gw, eps)`` of two check runs, side by side."""
    return tuple(np.concatenate([a, b], -2) for a, b in zip(pair, more, strict=True))


def _lower(a, b):
    """Per problem, the one of two gap ``Estimate``s (or ``None``) that is lower; NaN (no
    verdict) wins."""
    if a is None:
        return None
    lower = ~(b.mean >= a.mean)
    return Estimate(*(np.where(lower, y, x) for x, y in zip(a, b, strict=True)))


def _warn_nonfinite_elbo(estimate):
    """Warn once (when first computed) if the final ELBO estimate is NaN or infinite: a target
    that is NaN or -inf at some of q's draws, which the fit's one or few draws per step may
    never have met (found in review: converged, ELBO NaN, no word)."""
    warn_nonfinite(estimate.mean, "FitResult.elbo: the final ELBO estimate",
                   "the target's log density is NaN or infinite at some draws of q, which the "
                   "fit's steps did not meet", stacklevel=3)


class _PendingEstimate:
    """The final ELBO estimate, computed when called (``FitResult.elbo``). Copying or pickling
    it computes it: what is stored is the ``Estimate``, not the compiled program."""

    def __init__(self, future, args):
        self._future, self._args = future, args

    def __call__(self):
        return self._future.result()(*self._args)

    def __reduce__(self):
        return _identity, (self(),)


def _identity(x):
    return x


def clear_caches() -> None:
    """Drop vi_engine's ahead-of-time compiled executables (``jax.clear_caches()`` does not see
    them), so that the next fit traces and compiles from scratch: for cold-start timing."""
    _EXECUTABLES.clear()
    for fn in (_compiled_window, _compiled_setup, _compiled_final, _compiled_estimate,
               _compiled_fixed):
        fn.cache_clear()


def _setup_executable(cfg, batch, dim, dtype, key, init_params, compile_there=False):
    """Future of the compiled setup (``_setup_fn``), at the least compile effort: it runs once
    per fit (and again for a NaN replay of the single executable's steps)."""
    return _executable(
        _compiled_setup(cfg.family, cfg.optimizer, dim, dtype, batch),
        ("setup", cfg.family, cfg.optimizer, dim, dtype, batch), key, init_params,
        effort="minimal", compile_there=compile_there,
    )


def _prepare(cfg, batch, dim, dtype, key, init_params, target, tol_arr, cap_arr,
             num_elbo_samples):
    """Start a fit that runs window by window: ``((state, run key, final key), future of the
    compiled window, futures of the compiled posterior and final ELBO)``
    (``_final_executables``). See ``_EXECUTABLES`` for the order."""
    jitted_setup = _compiled_setup(cfg.family, cfg.optimizer, dim, dtype, batch)
    # The window is lowered first, from the setup's output shapes alone: its compilation (the
    # longest) starts at once on the worker; the setup and then the final function follow it
    # there, lowered by this thread meanwhile.
    with _compile.gc_paused():
        state, k_run, k_final = jax.eval_shape(jitted_setup, key, init_params)
    batched = batch is not None
    window = _executable(
        _compiled_window(cfg, batched), ("window", cfg, batched),
        state, k_run, target, tol_arr, cap_arr, compile_there=True,
        effort=_window_tiers(cfg, dim, batch, dtype, key),
    )
    setup = _setup_executable(cfg, batch, dim, dtype, key, init_params, compile_there=True)
    final = _final_executables(cfg.family, num_elbo_samples, batched, k_final, state.params,
                               target, compile_there=True, check=_checks(cfg))
    state, k_run, k_final = setup.result()(key, init_params)
    return (state, k_run, k_final), window, final


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``vi.fit`` (and ``vi.fit_many``, with a leading batch axis ``(B,)``) returns.

    Attributes:
      posterior: numpyro Distribution over the target's unconstrained vector, event shape
        ``(dim,)`` (``Normal(...).to_event(1)``, ``MultivariateNormal``, ...).
      params: the family's parameters.
      losses: ``(num_steps,)`` per-step negative-ELBO estimates (``fit_many``: ``(B, T)``;
        entries past a problem's ``num_steps`` are padding: NaN, or for a problem rolled back
        after a non-finite step, the losses of the rolled-back steps).
      elbo: ``Estimate(mean, stderr)`` of the final ELBO (``num_elbo_samples`` draws, with a
        key split from the fit's, so it is reproducible), or ``None`` with
        ``num_elbo_samples=0``. Computed when first read (then kept): a fit compiles its
        estimate only if it is read (0.1-0.15 s on a first fit of a small problem).
        Copying or pickling a result computes it. (It is a property: construct a ``FitResult``
        with ``_elbo=`` rather than ``elbo=``.)
      num_steps: steps actually run. converged: the stopping rule fired.
      status: ``"converged"``, ``"max_steps"`` or ``"nonfinite"`` (per problem in fit_many).
      message: a human-readable report (why it stopped; a hint on non-finite values, or on a
        fit that converged short of its family's optimum).
      stationarity: max over the parameters' components of |mean| / standard error of the
        ELBO's gradient at the returned parameters (256 draws; ``fit_many``: per problem; see
        ``_stationarity``). At the family's optimum the gradient is zero and this stays under
        ~5; a converged fit above ``STATIONARITY_LIMIT`` (6, in ``vi_engine/fit.py``) stopped
        short of it, and a warning says so (measured on posteriordb: 1.0-4.2 for fits that
        match the reference, 87 and 375 for full-rank fits that converged 1.9-2.5 sds off).
        ``None`` with ``num_elbo_samples=0``.
      mean_gap: for ``MeanField`` and ``LowRank`` q (whose stationarity check, in q's own
        coordinates, does not see a ridge: q has no correlations to whiten with), an
        ``Estimate`` in nats of the ELBO that moving q's mean to its optimum would gain: the
        Newton decrement at the Hessian of log p̃ at q's mean (``_mean_gap``; exact for a
        Gaussian target). A converged fit above ``MEAN_GAP_LIMIT`` (0.25 nats, and three
        standard errors) stopped short, and is treated as above (measured on posteriordb:
        -0.12-0.10 for fits that match the reference; 1.9-3.0 for kidiq's mean-field fits,
        1.9-2.3 sds off, whose stationarity read 1.9-2.2); ``fit`` and ``fit_many`` polish
        such a mean by Newton steps (``fit``'s ``precondition``). NaN where that Hessian is not
        positive definite; ``None`` for other families, where d² exceeds the check's memory
        budget (d > 2048 for one problem), or with ``num_elbo_samples=0``.
      spread_gap: for ``FullRank``, ``MeanField`` and ``LowRank`` q, an ``Estimate`` in nats
        of the ELBO that moving q's spread to its optimum would gain, its mean held
        (``_spread_gap``:
        ``½ Σ (λ − 1 − log λ)`` over the eigenvalues of q's scale-whitened expected Hessian
        ``E_q[Lᵀ H L]``, which is the identity at the optimum for any target; exact for a
        Gaussian target). Above ``SPREAD_GAP_LIMIT`` (0.1 nats, and three standard errors) a
        converged fit stopped short, and is treated as above: a slow optimizer's plateau
        (``optax.sgd(1e-4)``, full-rank: 0.94-1.99 nats short, stationarity 5.0-5.7). Where
        one check's draws leave the verdict open (above the limit, within three standard
        errors), more check runs are pooled, up to 8 (2,048 draws). NaN where that matrix is
        not positive definite or a gradient not finite; ``None`` for other families, above
        d = 127 (full-rank) or 64 (mean-field and low-rank; the estimate needs 8·d draws: above
        d = 32, 2-4 check runs'; for low-rank q, a lower bound on a non-Gaussian target),
        where the check's draws do not fit one batch of its memory budget (``fit_many``:
        shared by the problems), or with ``num_elbo_samples=0``.
      family, target: what was fitted.

    >>> import jax, jax.numpy as jnp, vi_engine as vi
    >>> t = vi.Target.from_log_density(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), 2)
    >>> res = vi.fit(t, "fullrank", key=jax.random.key(0), tol=None, num_steps=500,
    ...              progress=False)
    >>> res.num_steps, res.losses.shape, res.status
    (500, (500,), 'max_steps')
    >>> res.posterior.event_shape, res.elbo.mean.shape
    ((2,), ())
    """

    posterior: Any
    params: Any
    losses: Any
    num_steps: Any
    converged: Any
    status: Any
    message: str
    family: Family
    target: Any
    stationarity: Any = None
    mean_gap: Any = None
    spread_gap: Any = None
    # An Estimate, None, or a _PendingEstimate computing it when first read (see ``elbo``).
    _elbo: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def elbo(self) -> Estimate | None:
        value = self._elbo
        if isinstance(value, _PendingEstimate):
            value = value()
            object.__setattr__(self, "_elbo", value)  # computed once (the result is frozen)
            _warn_nonfinite_elbo(value)
        return value

    def __repr__(self):
        # A summary: the dataclass default printed every array (params, losses) in full, and
        # not the ELBO. Reading the repr never computes a pending ELBO (a compilation).
        elbo = self._elbo
        if isinstance(elbo, _PendingEstimate):
            elbo = "<computed on first read of .elbo>"
        elif isinstance(elbo, Estimate):
            elbo = f"{_fmt(elbo.mean)} ± {_fmt(elbo.stderr)}"
        post = self.posterior
        shapes = f"batch_shape={tuple(post.batch_shape)}, event_shape={tuple(post.event_shape)}"
        return (
            f"FitResult(family={self.family.name!r}, status={_fmt(self.status)}, "
            f"num_steps={_fmt(self.num_steps)}, elbo={elbo}, "
            f"posterior={type(post).__name__}({shapes}), "
            f"target={getattr(self.target, 'name', '?')!r})"
        )

    def sample(self, key, num_samples):
        """Draws from q: for NumPyro targets a dict of constrained values per site, latent and
        deterministic, ``(num_samples, *batch, *site_shape)``; else the unconstrained draws
        ``(num_samples, *batch, dim)``. ``batch`` is ``(B,)`` for ``fit_many``, whose problem
        ``i`` is constrained with its own data (a support or a deterministic site may depend on
        it), else ``()``.

        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist, vi_engine as vi
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
        ...     numpyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> res = vi.fit(vi.Target.from_numpyro(model, jnp.array([0.5, -1.0])), "meanfield",
        ...              key=jax.random.key(0), num_steps=200, tol=None, progress=False)
        >>> res.sample(jax.random.key(1), 100)["s"].shape
        (100,)
        """
        check_key(key)
        num_samples = _positive_int("num_samples", num_samples)
        z = self.posterior.sample(key, (num_samples,))
        if not getattr(self.target, "site_names", ()):
            return z

        def constrain(target, z):
            return target.constrain(z)

        # fit_many's target holds every problem's data along axis 0: one problem at a time.
        for _ in self.posterior.batch_shape:
            constrain = jax.vmap(constrain, in_axes=(0, 1), out_axes=1)
        return constrain(self.target, z)


def _fmt(x):
    """A scalar as a short string; an array (fit_many) as its values, abbreviated by numpy."""
    x = np.asarray(x)
    if x.ndim == 0:
        return f"{x.item():.6g}" if x.dtype.kind == "f" else repr(x.item())
    return np.array2string(x, threshold=6, precision=6, separator=", ", max_line_width=10**6)


def _check_common(target, key, tol, num_elbo_samples):
    """Check the arguments fit and fit_many share; returns ``num_elbo_samples`` as an int (a
    NumPy integer would key the cached estimate program as the equal int: one kind only)."""
    check_target(target)
    if _under_transformation(target, key):
        raise TypeError(
            "vi.fit/vi.fit_many: called under a JAX transformation (jit, vmap, grad: the "
            "target's data, a value its log density closes over, or the key are tracers). A fit "
            "runs its own compiled loop, with "
            "host-side stopping and checks, so it cannot be traced; for many problems or seeds "
            "use vi.fit_many (one compiled call), and for a differentiable objective vi.elbo or "
            "an objective's .loss in your own loop."
        )
    check_key(key)
    if tol is not None and not (_is_real(tol) and tol >= 0):
        raise ValueError(f"tol: expected a non-negative number or None, got {tol!r}")
    if not (_is_int(num_elbo_samples) and num_elbo_samples >= 0):
        raise ValueError(
            f"num_elbo_samples: expected a non-negative integer (0: no final estimate), got "
            f"{num_elbo_samples!r}"
        )
    return int(num_elbo_samples)


def _some(indices, limit=10):
    """Indices as a short list string: the first ``limit``, then '...'."""
    indices = [int(i) for i in indices]
    return f"{indices[:limit]}{'...' if len(indices) > limit else ''}"


def _check_steps(num_steps, max_steps):
    """Of the public calls: both given is ambiguous (num_steps would win, silently)."""
    if num_steps is not None and max_steps is not None and max_steps != DEFAULT_MAX_STEPS:
        raise ValueError(
            f"num_steps={num_steps} and max_steps={max_steps}: pass one. num_steps is the exact "
            "count with tol=None and the cap with tol set; max_steps is the cap when num_steps "
            "is None"
        )


def _check_stopping(rule):
    """``rule`` with plain Python numbers (it keys the compiled window), or a ValueError."""
    if not isinstance(rule, StoppingRule):
        raise TypeError(f"stopping: expected a vi.StoppingRule, got {type(rule).__name__}")

    checks = {
        "window": (_is_int(rule.window) and rule.window >= 2, "an integer >= 2"),
        "patience": (_is_int(rule.patience) and rule.patience >= 1, "a positive integer"),
        "factor": (_is_real(rule.factor) and 0 < rule.factor < 1,
                   "a number in (0, 1): the step size is multiplied by it at each cut"),
        "max_decays": (_is_int(rule.max_decays) and rule.max_decays >= 0,
                       "a non-negative integer"),
        "z": (_is_real(rule.z) and rule.z >= 0, "a non-negative number"),
    }
    for name, (ok, want) in checks.items():
        if not ok:
            raise ValueError(f"stopping.{name}: expected {want}, got {getattr(rule, name)!r}")
    return StoppingRule(int(rule.window), int(rule.patience), float(rule.factor),
                        int(rule.max_decays), float(rule.z))


def _check_optimizer(optimizer):
    kind = type(optimizer).__module__ or ""
    if optimizer is None or isinstance(optimizer, optax.GradientTransformation) or (
        # optax's own wrappers that are classes (optax.MultiSteps), and other optax-like objects
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
        and not kind.startswith("numpyro")
    ):
        return
    if kind.startswith("numpyro"):
        hint = ("numpyro.optim optimizers are not supported; pass the optax one, e.g. "
                "optax.adam(1e-2)")
    elif callable(optimizer):
        hint = "call it with its settings, e.g. optax.adam(1e-2) rather than optax.adam"
    elif isinstance(optimizer, (int, float)):
        hint = ("for a learning rate pass optimizer=vi.default_optimizer(lr) (Adam, b2=0.99) or "
                "optax.adam(lr)")
    else:
        hint = "e.g. optax.adam(1e-2)"
    raise TypeError(
        f"optimizer: expected an optax GradientTransformation (or None for the default), got "
        f"{optimizer!r} ({type(optimizer).__name__}); {hint}"
    )


def _check_init_params(family, init_params, dim, dtype, batch=None):
    """``init_params`` in the fit's ``dtype`` (``None`` passes through). They must have the
    structure and shapes of ``family.init(key, dim)`` (with a leading ``batch`` axis on every
    leaf for ``fit_many``), floating-point, and finite where concrete. The dtype is the fit's,
    whatever they came in: float32 parameters under x64 failed inside the compiled loop (its
    carry turned float64) or, with ``tol=None``, ran the whole fit in float32; a NaN among them
    read as a fit that blew up at step 0 (found in review)."""
    if init_params is None:
        return None
    check_params("init_params", family, init_params, dim, batch)
    want = jax.eval_shape(lambda k: family.init(k, dim, dtype), jax.random.key(0))

    def cast(a, w):
        if jnp.result_type(a) == w.dtype:
            return a
        if isinstance(a, jax.Array):  # a device array (or a tracer): converted there
            return a.astype(w.dtype)
        return np.asarray(a, w.dtype)  # on the host: no conversion program to compile

    init_params = jax.tree_util.tree_map(cast, init_params, want)
    if not _compile.any_tracer(init_params):
        for path, leaf in jax.tree_util.tree_flatten_with_path(init_params)[0]:
            bad = ~np.isfinite(np.asarray(leaf))
            if bad.any():
                raise ValueError(
                    f"init_params{jax.tree_util.keystr(path)}: {int(bad.sum())} non-finite "
                    f"value(s) of {bad.size} (shape {np.shape(leaf)}); the fit starts from "
                    "these parameters, so they must all be finite"
                )
    return init_params


def _plan(num_steps, tol, progress, rule, max_steps):
    """Static chunking: (cap, steps per window, windows per sync, check_plateau, mask_steps).

    With ``tol`` set, the stopping rule judges whole windows and the cap is exact: a cap that is
    not a whole number of windows masks the steps past it (``mask_steps``, a select per step, so
    only then); with ``tol=None`` exactly ``num_steps`` steps run (without a progress bar: one
    window, which ``fit`` compiles with the setup into a single executable).
    """
    cap = num_steps if num_steps is not None else max_steps
    if tol is None:
        # Fixed number of steps, no plateau test: one window when nobody watches, else ~20.
        if not progress:
            return cap, cap, 1, False, False
        n = min(20, cap)
        return cap, -(-cap // n), 1, False, cap % n != 0
    # Windows are dispatched asynchronously; Python reads the done flag every few windows.
    return cap, rule.window, 5, True, cap % rule.window != 0


def _message(status, step, bad_step, cap, kept_finite=True):
    if status == CONVERGED:
        return f"converged after {step} steps (ELBO plateau at the smallest step size)"
    if status == MAX_STEPS:
        return f"stopped at the step cap ({cap} steps) before the stopping rule fired"
    if status == NONFINITE:
        kept = (f"those after {step} step(s), the last with a finite loss and update"
                if kept_finite else
                f"those after {step} step(s), whose loss was not finite (the fit's first step, "
                "or a window's: the fit keeps nothing from before it)")
        return (
            f"stopped at step {bad_step}: the loss or its gradient was NaN/inf there; the "
            f"parameters are {kept}. Hint: lower the step size (optimizer=...), "
            "start closer (init_scale), or check the target's log density for overflow "
            "(e.g. exp of an unconstrained parameter)"
        )
    return "running"


# q's marginal sd in an unconstrained coordinate above this is taken for a scale running away
# along a direction where log p̃ is flat (an improper target), not for a posterior's spread.
RUNAWAY_SD = 1e6
_RUNAWAY_DRAWS = 512


def _runaway_message(posterior, target, problems=None):
    """A hint naming the coordinates where q's spread ran away (sd > ``RUNAWAY_SD``, or not
    finite), or ``""``. A fit that ends non-finite or at its step cap this way has met a
    direction in which the target is flat: its ELBO grows without bound with q's entropy.
    (Measured: NumPyro's ``obs_mask`` on a continuous site leaves the observed entries of
    ``<site>_unobserved`` flat; the fit then stopped non-finite with those sds at inf.)
    ``problems``: for ``fit_many``, the indices of the problems to look at."""
    try:
        sd = np.sqrt(np.asarray(posterior.variance))
    except (NotImplementedError, AttributeError):
        # Flows: no closed-form variance, so the draws' (a fixed key: a diagnostic, the same
        # on every call); the message was missing for them (found in review).
        # (numpyro's Normal.sample broadcasts by rank promotion, which a caller may forbid.)
        with np.errstate(invalid="ignore", over="ignore"), jax.numpy_rank_promotion("allow"):
            draws = np.asarray(posterior.sample(jax.random.key(0), (_RUNAWAY_DRAWS,)),
                               np.float64)
            sd = np.std(draws, axis=0)
    if problems is None:
        runaway, where = np.flatnonzero(~(sd <= RUNAWAY_SD)), ""
    else:
        hit = [int(i) for i in problems if not np.all(sd[i] <= RUNAWAY_SD)]
        # Problems share their sites: the coordinates of the first such problem stand for all.
        runaway = np.flatnonzero(~(sd[hit[0]] <= RUNAWAY_SD)) if hit else np.zeros(0, int)
        where = f" in problems {_some(hit)}; in problem {hit[0]}," if hit else ""
    if runaway.size == 0:
        return ""
    names = _coordinate_names(target, runaway)
    return (
        f". q's sd ran away (above {RUNAWAY_SD:g}, or inf){where} in {len(names)} "
        f"coordinate(s): {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}: "
        "either the step size was too large for them (a fit that fails within its first "
        "steps), or the target's log density is flat (improper) along them: an improper "
        "prior on a parameter the data do not pin down, or NumPyro's obs_mask on a continuous "
        "site (the entries of '<site>_unobserved' where the mask is True have no density)"
    )


def _coordinate_names(target, indices):
    """Names of entries of the unconstrained vector: ``site[i, j]`` for NumPyro targets (in the
    site's unconstrained shape), else ``z[k]``."""
    spec = getattr(target, "_spec", None)  # its sites, without replaying the model
    sites = spec.latent if spec is not None else ()
    if not sites:
        return [f"z[{int(k)}]" for k in indices]
    names, offset, bounds = [], 0, []
    for s in sites:
        bounds.append((offset, offset + s.size, s))
        offset += s.size
    for k in indices:
        for lo, hi, s in bounds:
            if lo <= k < hi:
                idx = np.unravel_index(int(k) - lo, s.unconstrained_shape)
                names.append(s.name + (f"[{', '.join(str(int(i)) for i in idx)}]" if idx
                                       else ""))
    return names


def _dtype():
    return jnp.result_type(float)


def fit(
    target,
    family="fullrank",
    *,
    key,
    num_steps=None,
    optimizer=None,
    num_samples=None,
    objective="elbo",
    tol=DEFAULT_TOL,
    progress=True,
    init_params=None,
    max_steps=DEFAULT_MAX_STEPS,
    stopping=DEFAULT_STOPPING,
    num_elbo_samples=1000,
    precondition="auto",
):
    """Fit a variational family q to a target p̃ by minimizing KL(q‖p̃) (maximizing the ELBO).

    Args:
      target: a ``vi.Target`` over R^dim.
      family: ``"meanfield"``, ``"fullrank"``, ``"lowrank"``, ``"flow"`` (names of the default
        families) or a family object such as ``vi.LowRank(rank=5)`` or ``vi.Flow(num_layers=8)``.
      key: one PRNG key (required; split internally, never reused).
      num_steps: with ``tol=None``, exactly this many steps; with ``tol`` set, an exact cap (default
        ``max_steps``).
      optimizer: an optax ``GradientTransformation`` (default Adam(lr, b2=0.99) with the
        plateau step-size cuts; lr = ``family.default_learning_rate``, 0.05 for the Gaussian
        families, 0.01 for flows; for full-rank above 20 dimensions 0.05·20/dim). Pass the
        same object again to reuse compiled code.
      num_samples: draws per gradient estimate (default ``family.default_num_samples``: 1 for
        the Gaussian families, 16 for flows; for full-rank above 20 dimensions
        ``ceil(dim / 25)``).
      objective: ``"elbo"`` (STL estimator), ``"elbo-reparam"``, ``"elbo-entropy"``,
        ``"iwae"``, ``"renyi"``, or ``vi.ELBO(...)``, ``vi.IWAE(...)``, ``vi.Renyi(...)``.
      tol: plateau threshold in nats on window means (see the module doc); ``None`` runs exactly
        ``num_steps`` steps with a constant step size.
      progress: show a tqdm bar with the ELBO, updated between compiled chunks.
      init_params: start from these parameters instead of ``family.init``.
      max_steps: the step cap with ``tol`` set and ``num_steps=None`` (default 20,000); pass
        ``num_steps`` or ``max_steps``, not both.
      stopping: a ``vi.StoppingRule`` (window, patience, factor, max_decays, z).
      num_elbo_samples: draws for the final ELBO estimate; ``0`` skips it (``elbo`` is then
        ``None``). It is compiled only when read either way; ``0`` saves lowering it.
      precondition: ``"laplace"`` or a ``vi.Laplace`` (from ``vi.laplace(target)``): fit in
        coordinates whitened by the Laplace approximation, starting from it, and map the
        result back (same family, over the target's ``z``). For badly scaled or strongly
        correlated posteriors, where Adam's steps cannot follow the ridge (see
        ``vi_engine.preconditioning``); needs a proper mode. Gaussian families only.
        ``"auto"`` (default): fit as usual, and if the fit converged short of its family's
        optimum (``stationarity``, ``mean_gap`` or ``spread_gap`` above its limit), mend
        it. A mean-field or low-rank mean short on a ridge (``mean_gap``) first takes Newton
        steps on q's mean, q's spread held (a second or two; they land on the optimum of a
        Gaussian target); that is kept if it passes the checks and the stationarity and
        spread checks had passed before. Otherwise refit preconditioned, from the Laplace
        approximation whatever ``init_params`` (the message says so; ``num_steps`` and
        ``losses`` are then the refit's), its mean polished the same way if it needs it;
        where that is not possible (no proper mode, a flow), or when the refit does no
        better, keep the first fit, with a warning if it is still short. With
        ``"laplace"``, the refit's mean is polished too. ``None`` or ``False``: never. The
        checks need the ELBO objective and ``num_elbo_samples > 0``; without them there is
        no check, hence no refit.

    Returns:
      ``FitResult`` (posterior, params, losses, elbo, num_steps, converged, status, message,
      the checks stationarity, mean_gap and spread_gap, family, target).

    >>> import jax, jax.numpy as jnp, vi_engine as vi
    >>> target = vi.Target.from_log_density(lambda z: -0.5 * jnp.sum((z - 1.0) ** 2), 3)
    >>> res = vi.fit(target, "meanfield", key=jax.random.key(0), progress=False)
    >>> res.posterior.mean.shape
    (3,)
    """
    _check_steps(num_steps, max_steps)
    kwargs = dict(key=key, num_steps=num_steps, optimizer=optimizer, num_samples=num_samples,
                  objective=objective, tol=tol, progress=progress, max_steps=max_steps,
                  stopping=stopping, num_elbo_samples=num_elbo_samples)
    if precondition is None or precondition is False:
        return _fit(target, family, init_params=init_params, warn_short=True, **kwargs)
    if not (isinstance(precondition, str) and precondition == "auto"):
        res = _fit_preconditioned(target, family, precondition, init_params, kwargs,
                                  warn_short=False)
        res = _polish(res, jax.random.fold_in(key, 3), num_elbo_samples)
        if _stopped_short(res):
            res = _warn_short(res, _HINT_OTHER, stacklevel=2)
        return res
    res = _fit(target, family, init_params=init_params, warn_short=False, **kwargs)
    if not _stopped_short(res):
        return res
    first = _shortfall(res)[0]
    # A mean short on a ridge is polished by Newton steps (``_polish``), which suffices when
    # the rest of q was at its optimum: a converged fit whose stationarity check passed. When
    # that check failed too, q's spread may be short as well (kilpisjarvi, mean-field: the
    # polished fit's ELBO was 0.17-0.2 nats below the refit's), so the refit below is tried
    # even if the polished fit passes the checks; so is it when the spread gap flagged.
    stationary = ((res.stationarity is None or res.stationarity <= STATIONARITY_LIMIT)
                  and not _spread_flags(res.spread_gap))
    res = _polish(res, jax.random.fold_in(key, 2), num_elbo_samples)
    if stationary and not _stopped_short(res):
        return res
    from vi_engine import preconditioning as lp

    if not lp.supports(res.family) or not isinstance(target, Target):
        return _warn_short(res, _HINT_OTHER, stacklevel=2) if _stopped_short(res) else res
    try:
        # A key of its own (never reuse one); quiet: whether it is kept is decided here. It
        # starts at the Laplace approximation, not at init_params: the first fit started
        # there already (from a 50-step fit's parameters, refits in whitened coordinates did
        # no better, found in review).
        better = _fit_preconditioned(target, res.family, "laplace", None,
                                     dict(kwargs, key=jax.random.fold_in(key, 1)),
                                     warn_short=False, quiet=True)
        better = _polish(better, jax.random.fold_in(key, 3), num_elbo_samples)
    except ValueError as err:  # no proper mode (a funnel): keep the first fit, and say why
        why = f"was not possible: {err}"
    else:
        # Kept only if it converged and its ELBO is not lower (within 3 standard errors): a
        # refit can fail where the first fit did not (a large full-rank d, measured in review).
        e0, e1 = res.elbo, better.elbo
        if better.status == "converged" and _not_lower(e0, e1):
            message = (f"{better.message} (refitted in coordinates whitened by the Laplace "
                       f"approximation: the first fit converged after {res.num_steps} steps "
                       f"short of the family's optimum, {first})")
            better = dataclasses.replace(better, message=message)
            if _stopped_short(better):
                better = _warn_short(better, _HINT_OTHER, stacklevel=2)
            return better
        why = (f"did no better ({better.status} after {better.num_steps} steps, ELBO "
               f"{float(e1.mean):.6g} against {float(e0.mean):.6g})")
    if not _stopped_short(res):  # the polished first fit passes the checks: kept
        return res
    why = f"; a refit in coordinates whitened by the Laplace approximation {why}"
    return _warn_short(res, _HINT_OTHER, stacklevel=2, more=why)


def _stopped_short(res):
    """A converged fit whose ELBO gradient is not zero (``FitResult.stationarity``), or whose
    mean or spread is measurably short of its optimum (``FitResult.mean_gap``,
    ``FitResult.spread_gap``)."""
    return bool(_short_mask(res.status == "converged", res.stationarity, res.mean_gap,
                            res.spread_gap))


def _short_mask(converged, stationarity, gap, spread=None):
    """``_stopped_short`` per problem: ``converged`` and the checks (``None`` without them) of
    one fit or of ``fit_many``'s ``(B,)`` problems."""
    by_z = False if stationarity is None else np.asarray(stationarity) > STATIONARITY_LIMIT
    return np.asarray(converged) & (by_z | _gap_flags(gap) | _spread_flags(spread))


def _shortfall(res):
    """``(phrase, cause)``: what says that ``res`` stopped short (``_stopped_short`` is true),
    and its likely cause, for ``_short_message``."""
    if res.stationarity is not None and res.stationarity > STATIONARITY_LIMIT:
        return (f"its ELBO gradient {res.stationarity:.3g} standard errors from zero "
                f"(stationarity > {STATIONARITY_LIMIT:g})"), _RIDGE
    if _gap_flags(res.mean_gap):
        return (f"its mean an estimated {res.mean_gap.mean:.3g} ± {res.mean_gap.stderr:.2g} "
                f"nats of ELBO short of the optimum (mean_gap > {MEAN_GAP_LIMIT:g})"), _RIDGE
    return (f"its spread an estimated {res.spread_gap.mean:.3g} ± {res.spread_gap.stderr:.2g} "
            f"nats of ELBO short of the optimum (spread_gap > {SPREAD_GAP_LIMIT:g})"), _SLOW


def _warn_short(res, hint, stacklevel, more=""):
    """``res`` with its message saying that it stopped short of its family's optimum (and
    ``more``), and a warning of it, whose ``stacklevel`` is as if the caller raised it."""
    message = res.message + _short_message(*_shortfall(res), hint) + more
    warnings.warn(f"vi.fit: {message}", RuntimeWarning, stacklevel=stacklevel + 1)
    return dataclasses.replace(res, message=message)


def _fit(target, family, *, key, num_steps, optimizer, num_samples, objective, tol, progress,
         max_steps, stopping, num_elbo_samples, init_params, warn_short, quiet=False,
         stacklevel=3):
    """``fit`` without preconditioning; ``warn_short``: warn if it converged short of the
    family's optimum (``fit`` with ``precondition="auto"`` refits instead); ``quiet``: no
    warnings at all (the message still says everything); ``stacklevel``: of the warnings, so
    that they point at the caller's line."""
    family, cfg, cap, per_sync = _configure(
        family, objective, num_samples, optimizer, num_steps, tol, progress, stopping, max_steps
    )
    num_elbo_samples = _check_common(target, key, tol, num_elbo_samples)
    note = getattr(family, "dimension_note", lambda dim: None)(target.dim)
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=stacklevel)
    cfg = _scale_defaults(cfg, target.dim, optimizer, num_samples)
    cfg = _with_presample(cfg, target.dim, None, key)
    dtype = _dtype()
    init_params = _check_init_params(family, init_params, target.dim, dtype)
    tol_arr, cap_arr = _scalars(tol, cap, dtype)
    fixed = tol is None and not progress
    run = _optimize(cfg, None, target.dim, dtype, key, init_params, target, tol_arr, cap_arr,
                    per_sync, progress, f"fit {family.name}", num_elbo_samples, fixed)
    params, chunks, final, k_final = run.params, run.chunks, run.final, run.k_final
    step, status, bad_step = (int(x) for x in run.info)
    # The window's first non-finite loss at its very start: no replay, and no parameters from
    # before it to keep (a non-finite update is found by the replay, at its exact step).
    kept_finite = not (status == NONFINITE and bad_step <= step)
    if status == NONFINITE and bad_step > step:
        state, k_run, k_final = run.start()
        state = _replay_to_last_finite(cfg, state, k_run, target, tol_arr, bad_step,
                                       run.effort)
        params, step, bad_step = state.params, int(state.step), int(state.bad_step)
        final = _final_executables(family, num_elbo_samples, False, k_final, params, target,
                                   check=_checks(cfg))
    message = _message(status, step, bad_step, cap, kept_finite)
    estimate, parts, stationarity, mean_gap, spread_gap = _finish(final, k_final, params, target)
    posterior = _posterior(parts)
    # A fit that failed to converge may have met a flat direction (not a fixed-step fit, whose
    # status is always max_steps: its time is measured as a whole in benchmarks/).
    if status == NONFINITE or (status == MAX_STEPS and tol is not None):
        message += _runaway_message(posterior, target)
    if status == NONFINITE and not quiet:
        warnings.warn(f"vi.fit: {message}", RuntimeWarning, stacklevel=stacklevel)
    res = FitResult(
        posterior=posterior,
        params=params,
        losses=_join(chunks, step),
        _elbo=estimate,
        num_steps=step,
        converged=status == CONVERGED,
        status=_STATUS_NAMES[status],
        message=message,
        family=family,
        target=target,
        stationarity=stationarity,
        mean_gap=mean_gap,
        spread_gap=spread_gap,
    )
    if warn_short and not quiet and _stopped_short(res):
        from vi_engine import preconditioning as lp

        res = _warn_short(res, _HINT_FIT if lp.supports(family) else _HINT_OTHER, stacklevel)
    return res


_HINT_FIT = ("Try precondition='laplace' (the default, precondition='auto', polishes the mean "
             "or refits so where it can)")
_HINT_OTHER = "Try more steps (max_steps, stopping) or another family"
_HINT_MANY = "fit_many's default, precondition='auto', polishes their means or refits them"


_RIDGE = ("as on a ridge Adam's steps cannot follow (a badly scaled or strongly correlated "
          "posterior)")


# A spread short while the gradient test and the mean pass: the motivating case was a step size
# too small to finish (plain SGD at 1e-4), whose slow progress the plateau test took for
# convergence.
_SLOW = ("as when the steps are too small to finish (slow progress the plateau test took for "
         "convergence) or the posterior is badly scaled")


def _short_message(shortfall, cause, hint):
    return f"; but {shortfall}: the fit stopped short of the family's optimum, {cause}. {hint}"


def _fit_preconditioned(target, family, precondition, init_params, kwargs, warn_short=True,
                        quiet=False):
    """``fit`` in coordinates whitened by a Laplace approximation
    (``vi_engine.preconditioning``)."""
    from vi_engine import preconditioning as lp

    family = get_family(family)
    lp.check_family(family)
    if not isinstance(target, Target):
        raise TypeError(f"target: expected a vi.Target, got {type(target).__name__}")
    # Every argument is checked before the mode search (a second or more of compiling).
    _configure(family, kwargs["objective"], kwargs["num_samples"], kwargs["optimizer"],
               kwargs["num_steps"], kwargs["tol"], kwargs["progress"], kwargs["stopping"],
               kwargs["max_steps"])
    _check_common(target, kwargs["key"], kwargs["tol"], kwargs["num_elbo_samples"])
    dtype = _dtype()
    init_params = _check_init_params(family, init_params, target.dim, dtype)
    if isinstance(precondition, str):
        if precondition != "laplace":
            raise ValueError(
                f"precondition: expected None, 'laplace' or a vi.Laplace, got {precondition!r}"
            )
        lap = lp.laplace(target)
        if not lap.converged:
            raise ValueError(
                f"vi.fit: precondition='laplace': the mode search of target {target.name!r} did "
                f"not converge (Newton decrement {float(lap.decrement):.3g} nats after "
                f"{lap.num_iters} L-BFGS iterations and {lap.num_newton} Newton steps, log p̃ "
                f"{float(lap.log_density):.6g}): no proper mode? (an unbounded density such as "
                "a hierarchical funnel). Fit without precondition, or pass vi.laplace(target, "
                "init=...) after checking it."
            )
    elif isinstance(precondition, lp.Laplace):
        lap = precondition
        if np.shape(lap.mode) != (target.dim,) or np.shape(lap.scale_tril) != (target.dim,) * 2:
            raise ValueError(
                f"precondition: a vi.Laplace over dim {target.dim} expected, got mode shape "
                f"{np.shape(lap.mode)} and scale_tril shape {np.shape(lap.scale_tril)}"
            )
        if not lap.converged:
            warnings.warn(
                "vi.fit: the vi.Laplace passed as precondition did not converge (Newton "
                f"decrement {float(lap.decrement):.3g} nats): the whitening may be poor.",
                RuntimeWarning, stacklevel=3,
            )
    else:
        raise TypeError(
            "precondition: expected None, 'laplace' or a vi.Laplace, got "
            f"{type(precondition).__name__}"
        )
    lap = _in_dtype(lap, dtype)
    mode, lo = lap.mode, lp.whitening(family, lap)
    start = lp.start_family(family)
    if init_params is not None:
        init_params = lp.to_w(start, init_params, mode, lo)
    else:
        init_params = lp.start_params(start, kwargs["key"], lap.precision, lo)
    res = _fit(lp.whitened_target(target, mode, lo), start, init_params=init_params,
               warn_short=False, quiet=quiet, stacklevel=4, **kwargs)
    params = lp.to_z(start, res.params, mode, lo)
    res = dataclasses.replace(
        res, posterior=_posterior(_compiled_final(family)(params)), params=params,
        family=family, target=target,
    )
    if warn_short and not quiet and _stopped_short(res):
        res = _warn_short(res, _HINT_OTHER, stacklevel=3)
    return res


def _in_dtype(lap, dtype):
    """A ``vi.Laplace``'s arrays in a fit's dtype (one computed under x64 may whiten a float32
    fit)."""
    return lap._replace(**{f: jnp.asarray(np.asarray(getattr(lap, f)), dtype)
                           for f in ("mode", "scale_tril", "precision")})


class _Run(NamedTuple):
    """What ``_optimize`` returns. ``info``: host ``(steps, status, bad_steps)``; ``final``: the
    futures of ``_final_executables``; ``start()`` gives the state, run key and final key that a
    NaN replay starts from (on the single-executable path the setup state, where its one
    rolled-back window starts); ``effort`` is the compile effort of the program that ran the
    steps (the single executable or the window), which a NaN replay is compiled with."""

    params: Any
    info: tuple
    chunks: list
    final: Any
    k_final: Any
    start: Any
    effort: str


def _optimize(cfg, batch, dim, dtype, key, init_params, target, tol_arr, cap_arr, per_sync,
              progress, desc, num_elbo_samples, fixed):
    """The optimization shared by ``fit`` (``batch=None``) and ``fit_many``: with ``fixed``
    (``tol=None``, no progress bar) one executable, else windows until every problem is done."""
    if fixed:
        # Compiled ahead of time like a window, with the effort of a window of the same steps:
        # the per-step work decides it (_window_tiers), not the number of steps.
        args = (key, target, init_params, tol_arr, cap_arr)
        compiled = _executable(
            _compiled_fixed(cfg, batch, dim, dtype), ("fixed", cfg, batch, dim, dtype), *args,
            effort=_window_tiers(cfg, dim, batch, dtype, key),
        )
        program = compiled.result()
        # The posterior and the final ELBO are lowered before the steps run (from the output
        # shapes), so that a family that cannot build them (a batched flow) fails first.
        params_info, _, _, k_final_info = program.out_info
        final = _final_executables(cfg.family, num_elbo_samples, batch is not None,
                                   k_final_info, params_info, target, check=_checks(cfg))
        params, info, losses, k_final = program(*args)

        def start():  # rolled back to the setup state: rebuild it (same key, same state)
            setup = _setup_executable(cfg, batch, dim, dtype, key, init_params)
            return setup.result()(key, init_params)

        return _Run(params, jax.device_get(info), [losses], final, k_final, start,
                    compiled.effort)
    started, window, final = _prepare(cfg, batch, dim, dtype, key, init_params, target, tol_arr,
                                      cap_arr, num_elbo_samples)
    state, k_run, k_final = started
    state, chunks = _drive(window.result(), batch is not None, state, k_run, target, tol_arr,
                           cap_arr, per_sync, progress, desc, cfg.check_plateau)
    info = jax.device_get((state.step, state.status, state.bad_step))
    return _Run(state.params, info, chunks, final, k_final, lambda: (state, k_run, k_final),
                window.effort)


def _scalars(tol, cap, dtype):
    # numpy scalars: passed to compiled code without an eager (compiled) conversion op.
    return np.asarray(0.0 if tol is None else tol, dtype), np.asarray(cap, np.int32)


def _join(chunks, num_steps):
    """Per-step losses ``(..., num_steps)`` from the windows' chunks, joined on the host (an
    eager ``jnp.concatenate`` would compile once per number of chunks)."""
    if len(chunks) == 1 and chunks[0].shape[-1] == num_steps:
        return chunks[0]  # nothing to cut: no round trip through the host
    losses = np.concatenate([np.asarray(c) for c in chunks], axis=-1)
    # device_put, not jnp.asarray: on this JAX, jnp.asarray of a host array compiles a small
    # program per shape (0.015 s on a first fit, measured).
    return jax.device_put(losses[..., :num_steps])


# A full-rank q in d dimensions has d(d+3)/2 parameters, and Adam steps about its learning rate
# in each: past d=20 the defaults scale down the step and up the draws. Measured (exact
# Gaussians, correlation 0.5, 2 seeds; KL(q‖p*)): at 0.05 and 1 draw, d=50 0.0045-0.009,
# d=100 846-4741, d=200 non-finite or 1,200-12,000; with 0.05·20/d and ceil(d/25) draws, d=50
# 2-4e-4, d=100 0.0025-0.0037, d=200 0.012-0.017, and linear regressions (N=1000, d=50; N=300,
# d=100) 1e-4. At d <= 20 nothing changes (linear regression N=500, d=20 reaches 8e-5).
_LARGE_D = 20
_DIM_PER_DRAW = 25


def _scale_defaults(cfg, dim, optimizer, num_samples):
    """``cfg`` with the full-rank defaults for ``dim`` (the step size and draws the caller left
    to the defaults only)."""
    if not isinstance(cfg.family, FullRank) or dim <= _LARGE_D:
        return cfg
    if optimizer is None:
        cfg = cfg._replace(optimizer=default_optimizer(
            cfg.family.default_learning_rate * _LARGE_D / dim))
    if num_samples is None:
        cfg = cfg._replace(num_samples=math.ceil(dim / _DIM_PER_DRAW))
    return cfg


def _configure(family, objective, num_samples, optimizer, num_steps, tol, progress, stopping,
               max_steps):
    """Resolve names and defaults into the static configuration of the compiled window."""
    num_steps = _positive_int("num_steps", num_steps, none_ok=True)
    max_steps = _positive_int("max_steps", max_steps)
    if tol is None and num_steps is None:
        raise ValueError(
            "num_steps: with tol=None the fit runs exactly num_steps steps, so num_steps is "
            "required (or set tol to run until converged)"
        )
    _check_optimizer(optimizer)
    family = get_family(family)
    objective = get_objective(objective)
    if isinstance(objective, Renyi) and objective.alpha < 0:
        raise ValueError(
            f"objective: {objective} is an upper bound on log p(D) for alpha < 0 (equal to it "
            "only at q = p), so maximizing it moves q away from the posterior; fit with "
            "0 <= alpha < 1 (between IWAE and the ELBO) or alpha > 1. (Renyi with alpha < 0 "
            "still evaluates the bound: vi.Renyi(alpha).loss.)"
        )
    num_samples = _positive_int(
        "num_samples", family.default_num_samples if num_samples is None else num_samples
    )
    if optimizer is None:
        optimizer = default_optimizer(family.default_learning_rate)
    stopping = _check_stopping(stopping)
    cap, window, per_sync, check, mask = _plan(num_steps, tol, progress, stopping, max_steps)
    cfg = _Config(family, objective, optimizer, num_samples, window, check, mask, stopping)
    return family, cfg, cap, per_sync


def _drive(window, batched, state, key, target, tol_arr, cap_arr, per_sync, progress, desc,
           until_converged):
    """Run compiled windows until every problem is done; ``(state, chunks of losses)``.

    Windows are dispatched ``per_sync`` at a time without waiting (JAX runs them
    asynchronously); Python then reads the done flags once and updates the progress bar.
    Steps are applied contiguously from the start, so a problem's first ``num_steps`` joined
    losses are its own (a replayed window repeats the rolled-back one exactly); NaN follows.
    Until convergence the bar counts steps without a total: the cap (20,000 by default) is a
    bound, and a bar drawn against it stopped at a fifth of its length.
    """
    cap = int(cap_arr)
    chunks = []
    with tqdm(total=None if until_converged else cap, unit=" steps", disable=not progress,
              desc=desc, leave=False) as bar:
        seen = 0
        while True:
            for _ in range(per_sync):
                state, losses = window(state, key, target, tol_arr, cap_arr)
                chunks.append(losses)
            done = np.asarray(state.done)
            if progress:
                furthest = int(np.max(np.asarray(state.step)))
                bar.update(furthest - seen)
                seen = furthest
                if batched:
                    bar.set_postfix(done=f"{int(done.sum())}/{done.size}")
                else:
                    recent = np.asarray(chunks[-1])
                    recent = recent[np.isfinite(recent)]
                    if recent.size:
                        bar.set_postfix(elbo=f"{-recent.mean():.4g}")
            if done.all():
                break
    return state, chunks


def _replay_executable(cfg, batched, effort, running, key, target, tol_arr, limit):
    """The compiled step-masked window of a NaN replay, up to step cap ``limit`` (one per
    problem when ``batched``), compiled with ``effort``: that of the program whose steps it
    repeats (``_Run.effort``)."""
    masked = cfg._replace(mask_steps=True, guard_steps=True)
    return _executable(
        _compiled_window(masked, batched, cap_per_problem=batched),
        ("replay", masked, batched, effort), running, key, target, tol_arr, limit, effort=effort,
    ).result()


def _replay_to_last_finite(cfg, state, key, target, tol_arr, bad_step, effort):
    """Re-run a rolled-back window up to (not including) its first non-finite step.

    ``bad_step``: the window's first non-finite loss, or its end when every loss was finite (a
    NaN/inf gradient shows only in the parameters). The replay applies no step whose loss or new
    parameters are not finite (``guard_steps``), nor any later one, and its ``bad_step`` is that
    step. Same keys, same start, same arithmetic compiled with the same effort as the window
    that failed (``effort``: see ``_replay_executable``), so the same finite steps up to float
    rounding (it is a separately compiled program: parameters agreed to 7e-7 after 200 steps,
    measured): the fit keeps the parameters of the last finite step, not of the window's start.
    Where the replay reached ``bad_step`` itself (a non-finite loss there, at parameters whose
    update was finite), it runs once more to the step before: those parameters are in doubt.
    Compiled only when a fit hits a NaN.
    """
    bad = np.asarray(bad_step, np.int32)
    running = state._replace(done=np.asarray(False), status=np.asarray(RUNNING, np.int32))
    replay = _replay_executable(cfg, False, effort, running, key, target, tol_arr, bad)
    state, _ = replay(running, key, target, tol_arr, bad)
    if int(state.status) != MAX_STEPS:  # the guard stopped it: a non-finite update
        bad = np.asarray(state.step, np.int32)
    elif bad > int(running.step):
        # It reached step ``bad``, whose loss was not finite at these parameters: they are in
        # doubt too (a step size too large leaves finite parameters whose q overflows), so the
        # fit keeps those before, whose loss was finite.
        state, _ = replay(running, key, target, tol_arr, bad - 1)
    return state._replace(
        done=np.asarray(True), status=np.asarray(NONFINITE, np.int32), bad_step=bad
    )


def _replay_many_to_last_finite(cfg, start, keys, targets, tol_arr, nonfinite, bad_steps, effort,
                                params, steps):
    """``fit_many``'s NaN replay: each problem in ``nonfinite`` re-runs its rolled-back window,
    from ``start`` (its state at that window's start), up to its first non-finite step, as
    ``_replay_to_last_finite`` does for one problem; the others keep ``params`` and ``steps``.
    Returns ``(params, steps, failed, stuck)``: ``failed``, each problem's first non-finite
    step (``steps`` may be one less: see ``back`` below); ``stuck``, the problems whose loss
    turned non-finite at their window's start, whose kept parameters are those of that loss.
    """
    size = nonfinite.shape[0]
    # As in _replay_to_last_finite: each problem stops at its first non-finite step.
    running = start._replace(done=np.zeros(size, bool),
                             status=np.full(size, RUNNING, np.int32))
    # The other problems take no step.
    limit = np.where(nonfinite, bad_steps, np.asarray(start.step)).astype(np.int32)
    replay = _replay_executable(cfg, True, effort, running, keys, targets, tol_arr, limit)
    new, _ = replay(running, keys, targets, tol_arr, limit)
    # As in _replay_to_last_finite: a problem that reached its non-finite step (a loss, not
    # an update) keeps the parameters before it.
    reached = np.asarray(new.status) == MAX_STEPS
    failed = np.where(reached, limit, np.asarray(new.step))
    back = nonfinite & reached & (limit > np.asarray(start.step))
    stuck = nonfinite & reached & ~back  # reached at the window's start: nothing before it
    if back.any():
        new, _ = replay(running, keys, targets, tol_arr, np.where(back, limit - 1, limit))
    return (_where_problems(nonfinite, new.params, params),
            np.where(nonfinite, np.asarray(new.step), steps), failed, stuck)


def _take(tree, rows):
    """Rows ``rows`` (indices or a mask) of every leaf, the problems' axis; on the host (an
    eager gather compiles a program per leaf shape), but for typed PRNG keys (no host form)."""
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)

    def take(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            return x[jnp.asarray(rows)]
        return jax.device_put(np.asarray(x)[rows])

    return jax.tree_util.tree_map(take, tree)


def _put_rows(tree, rows, new):
    """``tree`` (host copies of its leaves) with rows ``rows`` replaced by ``new``'s leaves."""

    def put(x, y):
        x = np.array(x)
        x[rows] = np.asarray(y)
        return x

    return jax.tree_util.tree_map(put, tree, new)


def _put_losses(losses, rows, new, width):
    """``(B, width)`` losses: ``losses`` with rows ``rows`` replaced by ``new``
    ``(len(rows), T')``, NaN-padded (``width``: the longest ``num_steps`` after the splice)."""
    losses, new = np.asarray(losses), np.asarray(new)
    out = np.full((losses.shape[0], max(losses.shape[1], new.shape[1])), np.nan, losses.dtype)
    out[:, :losses.shape[1]] = losses
    out[rows] = np.nan
    out[rows, :new.shape[1]] = new
    return jax.device_put(out[:, :width])


def _whitened_many(family, key, targets, lap, init_params, options, quiet):
    """``fit_many`` of ``targets`` in the coordinates ``z = mode + lo w`` of their Laplace
    approximations ``lap`` (``laplace_many``'s, each a proper mode), mapped back: a
    ``FitResult`` over ``targets`` (as ``_fit_preconditioned`` does for one)."""
    from vi_engine import preconditioning as lp

    lap = _in_dtype(lap, _dtype())
    mode = lap.mode
    lo = jax.vmap(functools.partial(lp.whitening, family))(lap)
    start = lp.start_family(family)
    if init_params is not None:
        init_params = jax.vmap(functools.partial(lp.to_w, start))(init_params, mode, lo)
    else:
        init_params = lp.start_params(start, key, lap.precision, lo)
    res = _fit_many(lp.whitened_target, (targets, mode, lo), family=start, key=key,
                    init_params=init_params, precondition="polish", quiet=quiet,
                    hint=_HINT_OTHER, **options)
    params = jax.vmap(functools.partial(lp.to_z, start))(res.params, mode, lo)
    parts = _executable(_compiled_final(family), ("final", family), params,
                        effort=_compile.ONCE).result()(params)
    return dataclasses.replace(res, posterior=_posterior(parts), params=params, family=family,
                               target=targets)


def _refit_many(family, key, targets, still, options, estimate):
    """The problems of the ``(B,)`` mask ``still`` refitted by ``_whitened_many``, quietly.
    Returns ``(rows, kept, result, no_mode)``: ``rows`` the problems refitted (those with a
    proper mode), ``kept`` a mask over ``rows`` of the refits that converged with an ELBO not
    lower than ``estimate``'s (by 3 standard errors), ``result`` the refits' ``FitResult``
    (``None`` if no row), ``no_mode`` the problems without a proper mode."""
    from vi_engine import preconditioning as lp

    idx = np.flatnonzero(still)
    sub = _take(targets, idx)
    lap, ok = lp.laplace_many(sub)
    rows = idx[ok]
    if not rows.size:
        return rows, np.zeros(0, bool), None, idx
    # From the Laplace approximations, not init_params (the first fit started there: see fit).
    res = _whitened_many(family, key, _take(sub, ok), _take(lap, ok), None, options, True)
    kept = np.asarray(res.converged) & _not_lower(_take(tuple(estimate), rows), res.elbo)
    return rows, kept, res, idx[~ok]


def fit_many(
    make_target,
    *batched_args,
    family="fullrank",
    key,
    num_steps=None,
    optimizer=None,
    num_samples=None,
    objective="elbo",
    tol=DEFAULT_TOL,
    progress=True,
    init_params=None,
    max_steps=DEFAULT_MAX_STEPS,
    stopping=DEFAULT_STOPPING,
    num_elbo_samples=1000,
    precondition="auto",
):
    """Fit B independent problems in one compiled call.

    ``make_target(*args_i)`` builds problem i from slice i (along axis 0) of each of
    ``batched_args``. Each problem stops on its own convergence (a per-problem done mask); the
    progress bar follows the batch as a whole. Options are as in ``vi.fit``, but for
    ``init_params``: the family's parameters of every problem, each leaf leading with ``B``
    (e.g. the ``params`` of an earlier ``fit_many``, to go on from there), flows, which
    ``fit_many`` does not fit (an error says so), and ``precondition``, which takes no
    ``vi.Laplace``.

    ``precondition``, per problem as in ``vi.fit``: ``"auto"`` (default) polishes the mean of
    a problem that converged short in its mean alone, and refits the problems still short of
    their family's optimum in coordinates whitened by their own Laplace approximations (all of
    them in one more compiled call), keeping a problem's refit where it converged and its ELBO
    is not lower (by 3 standard errors); ``"laplace"`` fits every problem that way from the
    start (an error names the problems without a proper mode); ``None`` or ``False``: neither
    polish nor refit (a warning names the problems left short).

    Returns:
      ``FitResult`` whose posterior has batch shape ``(B,)``; ``params`` leaves lead with ``B``;
      ``num_steps``, ``converged`` and ``status`` are ``(B,)`` arrays; ``elbo`` holds ``(B,)``
      means and standard errors. ``target`` is the batch of targets (``jax.vmap`` of
      ``make_target``: every data leaf leads with ``B``), whose methods take one problem's
      ``z``: take problem ``i`` first, ``jax.tree_util.tree_map(lambda a: a[i], res.target)``
      (``res.sample`` does that for every problem).

    >>> import jax, jax.numpy as jnp, vi_engine as vi
    >>> mus = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))
    >>> mk = lambda mu: vi.Target.from_log_density(
    ...     lambda z, m: -0.5 * jnp.sum((z - m) ** 2), 2, data=(mu,))
    >>> res = vi.fit_many(mk, mus, family="meanfield", key=jax.random.key(0), progress=False)
    >>> res.posterior.batch_shape
    (4,)
    """
    if not (precondition is None or precondition is False
            or (isinstance(precondition, str) and precondition in ("auto", "laplace"))):
        raise ValueError(
            f"precondition: expected None, 'auto' or 'laplace', got {precondition!r}"
        )
    _check_steps(num_steps, max_steps)
    return _fit_many(make_target, batched_args, family=family, key=key, num_steps=num_steps,
                     optimizer=optimizer, num_samples=num_samples, objective=objective,
                     tol=tol, progress=progress, init_params=init_params,
                     max_steps=max_steps, stopping=stopping,
                     num_elbo_samples=num_elbo_samples, precondition=precondition or None,
                     quiet=False)


def _fit_many(make_target, batched_args, *, family, key, num_steps, optimizer, num_samples,
              objective, tol, progress, init_params, max_steps, stopping, num_elbo_samples,
              precondition, quiet, hint=None):
    """``fit_many``; ``quiet``: no warning (its message still says everything); ``hint``: what
    the message suggests for problems left short of their optimum. ``precondition`` may also be
    ``"polish"`` (internal: the refits of ``_whitened_many``, whose means are polished as
    ``fit``'s refits are, but never refitted again)."""
    if hint is None:
        hint = _HINT_MANY if precondition is None else _HINT_OTHER
    options = dict(num_steps=num_steps, optimizer=optimizer, num_samples=num_samples,
                   objective=objective, tol=tol, progress=progress, max_steps=max_steps,
                   stopping=stopping, num_elbo_samples=num_elbo_samples)
    if not callable(make_target):
        raise TypeError(
            f"make_target: expected a function args_i -> vi.Target, got {type(make_target)}"
        )
    if not batched_args:
        raise ValueError("batched_args: give at least one array with a leading batch axis")
    sizes = []
    for i, a in enumerate(batched_args):
        leaves = jax.tree_util.tree_leaves(a)
        for leaf in leaves:
            shape = jnp.shape(leaf)
            if len(shape) == 0:
                # A list of rows is a pytree of scalars to JAX (found in review).
                hint = ("; it is a Python list/tuple, whose entries JAX takes as separate "
                        "leaves: pass an array (jnp.asarray(...))"
                        if isinstance(a, (list, tuple)) else "")
                raise ValueError(
                    f"batched_args[{i}]: expected a leading batch axis, got a scalar{hint}"
                )
            sizes.append((i, shape))
    batch = {s[0] for _, s in sizes}
    if len(batch) != 1:
        detail = ", ".join(f"batched_args[{i}] has shape {s}" for i, s in sizes)
        raise ValueError(f"batched_args: leading (batch) sizes differ: {detail}")
    (B,) = batch
    if B == 0:
        raise ValueError(f"batched_args: the batch is empty (leading size 0, shapes "
                         f"{[s for _, s in sizes]}); fit_many needs at least one problem")

    family, cfg, cap, per_sync = _configure(
        family, objective, num_samples, optimizer, num_steps, tol, progress, stopping, max_steps
    )
    targets = jax.vmap(make_target)(*batched_args)
    num_elbo_samples = _check_common(targets, key, tol, num_elbo_samples)
    check_batch(targets, B)
    cfg = _scale_defaults(cfg, targets.dim, optimizer, num_samples)
    cfg = _with_presample(cfg, targets.dim, B, key)
    dtype = _dtype()
    tol_arr, cap_arr = _scalars(tol, cap, dtype)
    init_params = _check_init_params(family, init_params, targets.dim, dtype, batch=B)
    if precondition == "laplace":
        from vi_engine import preconditioning as lp

        lp.check_family(family)
        lap, ok = lp.laplace_many(targets)
        if not ok.all():
            raise ValueError(
                f"vi.fit_many: precondition='laplace': the mode search of problems "
                f"{_some(np.flatnonzero(~ok))} found no proper mode (an unbounded density such "
                "as a hierarchical funnel, a saddle, or a search that did not converge: "
                "vi.laplace on one of them says which). Fit with precondition='auto' or None."
            )
        res = _whitened_many(family, key, targets, lap, init_params, options, True)
        message = ("fitted in coordinates whitened by each problem's Laplace approximation: "
                   f"{res.message}")
        if not quiet and np.any((res.status == "nonfinite")
                                | _short_mask(res.converged, res.stationarity, res.mean_gap,
                                              res.spread_gap)):
            warnings.warn(f"vi.fit_many: {message}", RuntimeWarning, stacklevel=3)
        return dataclasses.replace(res, message=message)
    fixed = tol is None and not progress
    run = _optimize(cfg, B, targets.dim, dtype, key, init_params, targets, tol_arr, cap_arr,
                    per_sync, progress, f"fit_many {family.name} x{B}", num_elbo_samples, fixed)
    params, chunks, final, k_final = run.params, run.chunks, run.final, run.k_final
    steps, status, bad_steps = run.info
    nonfinite = status == NONFINITE
    if nonfinite.any():
        state, k_run, k_final = run.start()
        params, steps, failed, stuck = _replay_many_to_last_finite(
            cfg, state, k_run, targets, tol_arr, nonfinite, bad_steps, run.effort, params, steps)
        final = _final_executables(family, num_elbo_samples, True, k_final, params, targets,
                                   check=_checks(cfg))
    names = np.array([_STATUS_NAMES[int(s)] for s in status])
    bad = np.flatnonzero(status == NONFINITE)
    counts = {n: int((names == n).sum()) for n in _STATUS_NAMES.values() if (names == n).any()}
    message = f"{B} problems: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    if bad.size:
        message += (
            f"; non-finite loss/gradient in problems {_some(bad)} (each keeps the parameters of "
            "its last step with a finite loss and update where the fit has them; num_steps says "
            "which)"
        )
        # The targets are built under vmap, so their data are not checked on construction: say
        # which of these problems have non-finite data, the likely cause.
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(batched_args)]
        leaves = [x for x in leaves if x.dtype.kind in "fc" and x.ndim >= 1]
        with_nan = [int(i) for i in bad if any(not np.isfinite(x[i]).all() for x in leaves)]
        if with_nan:
            message += f"; problems {_some(with_nan)} have NaN/inf in their data (batched_args)"
        failed = np.asarray(failed)[bad]
        at_start = bad[failed == 0]
        if at_start.size:
            message += (f"; problems {_some(at_start)} failed at their first step (check their "
                        "log density and data)")
        kept_bad = bad[(failed > 0) & stuck[bad]]
        if kept_bad.size:
            message += (f"; problems {_some(kept_bad)} keep parameters whose loss was not finite "
                        "(the first step of a window failed: the fit keeps nothing from before "
                        "it)")
        message += (". Hint: lower the step size (optimizer=...), or check the targets' log "
                    "density for overflow")
    estimate, parts, stationarity, mean_gap, spread_gap = _finish(final, k_final, params,
                                                                  targets)
    if mean_gap is not None and precondition is not None:
        # As in fit: a converged problem short in its mean alone (its stationarity check
        # passed) is polished by Newton steps on its mean (_polish); others are refitted below.
        # Not with precondition=None, which means "never", as in fit (it polished, found in
        # review).
        flagged = ((status == CONVERGED) & _gap_flags(mean_gap)
                   & (stationarity <= STATIONARITY_LIMIT) & ~_spread_flags(spread_gap))
        if flagged.any():
            before = mean_gap
            params, estimate, parts, stationarity, mean_gap, spread_gap, kept = _polish_many(
                family, jax.random.fold_in(key, 2), params, targets, flagged, estimate,
                stationarity, mean_gap, spread_gap, num_elbo_samples)
            if kept.any():
                message += (
                    f"; problems {_some(np.flatnonzero(kept))} converged with their means "
                    f"short (mean_gap up to {np.max(before.mean[kept]):.3g} nats), and took "
                    "Newton steps to their optimum, their spread held (mean_gap now at most "
                    f"{np.max(mean_gap.mean[kept]):.2g})"
                )
    losses = _join(chunks, int(steps.max()))
    if precondition == "auto" and stationarity is not None:
        # As in fit: the problems still short are refitted from their Laplace approximations.
        from vi_engine import preconditioning as lp

        still = _short_mask(status == CONVERGED, stationarity, mean_gap, spread_gap)
        if still.any() and lp.supports(family):
            estimate = estimate() if isinstance(estimate, _PendingEstimate) else estimate
            rows, kept, new, no_mode = _refit_many(
                family, jax.random.fold_in(key, 1), targets, still, options, estimate)
            acc = rows[kept]
            if acc.size:
                sel = np.flatnonzero(kept)
                gain = np.asarray(new.elbo.mean)[sel] - np.asarray(estimate.mean)[acc]
                params = jax.device_put(_put_rows(params, acc, _take(new.params, sel)))
                estimate = Estimate(*_put_rows(tuple(estimate), acc, _take(tuple(new.elbo), sel)))
                stationarity = _put_rows(stationarity, acc, _take(new.stationarity, sel))
                if mean_gap is not None:
                    mean_gap = Estimate(*_put_rows(tuple(mean_gap), acc,
                                                   _take(tuple(new.mean_gap), sel)))
                if spread_gap is not None:  # (NaN, no verdict, where a refit has none)
                    fresh = (new.spread_gap if new.spread_gap is not None else
                             Estimate(*(np.full(np.shape(new.converged), np.nan),) * 2))
                    spread_gap = Estimate(*_put_rows(tuple(spread_gap), acc,
                                                     _take(tuple(fresh), sel)))
                # (status stays: these problems were converged, and so are their refits)
                steps = _put_rows(steps, acc, _take(new.num_steps, sel))
                losses = _put_losses(losses, acc, _take(new.losses, sel), int(np.max(steps)))
                parts = _executable(_compiled_final(family), ("final", family), params,
                                    effort=_compile.ONCE).result()(params)
                message += (
                    f"; problems {_some(acc)} converged short of their family's optimum and "
                    "were refitted in coordinates whitened by their Laplace approximations "
                    f"(ELBO {np.min(gain):+.3g} to {np.max(gain):+.3g} nats)"
                )
            if no_mode.size:
                message += (f"; a refit of problems {_some(no_mode)} was not possible (no "
                            "proper mode found: see vi.laplace)")
            if (~kept).any():
                message += (f"; the refits of problems {_some(rows[~kept])} did no better "
                            "(not converged, or a lower ELBO) and were not kept")
    short = np.zeros((0,), int)
    if stationarity is not None:
        by_z = (status == CONVERGED) & (stationarity > STATIONARITY_LIMIT)
        by_gap = (status == CONVERGED) & _gap_flags(mean_gap)
        by_spread = (status == CONVERGED) & _spread_flags(spread_gap)
        short = np.flatnonzero(by_z | by_gap | by_spread)
        why = []
        if by_z.any():
            why.append(f"ELBO gradients up to {np.max(stationarity[by_z]):.3g} standard errors "
                       f"from zero (stationarity > {STATIONARITY_LIMIT:g})")
        if by_gap.any():
            why.append(f"means up to an estimated {np.max(mean_gap.mean[by_gap]):.3g} nats of "
                       f"ELBO short of the optimum (mean_gap > {MEAN_GAP_LIMIT:g})")
        if by_spread.any():
            why.append(f"spreads up to an estimated {np.max(spread_gap.mean[by_spread]):.3g} "
                       f"nats of ELBO short of the optimum (spread_gap > {SPREAD_GAP_LIMIT:g})")
    if short.size:
        message += (
            f"; problems {_some(short)} converged short of their family's optimum: "
            f"{' and '.join(why)}, {_RIDGE if (by_z | by_gap).any() else _SLOW}. {hint}"
        )
    posterior = _posterior(parts)
    if bad.size:
        message += _runaway_message(posterior, targets, bad)
    if (bad.size or short.size) and not quiet:  # one warning for both
        warnings.warn(f"vi.fit_many: {message}", RuntimeWarning, stacklevel=3)
    return FitResult(
        posterior=posterior,
        params=params,
        losses=losses,
        _elbo=estimate,
        num_steps=steps,
        converged=status == CONVERGED,
        status=names,
        message=message,
        family=family,
        target=targets,
        stationarity=stationarity,
        mean_gap=mean_gap,
        spread_gap=spread_gap,
    )
