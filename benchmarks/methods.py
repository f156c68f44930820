"""The baselines, each as a ``Method``: init, a compiled chunk of steps, and its q as a numpyro
distribution. ``run_trajectory`` turns any of them into a KL(q‖p*)-against-wall-time curve.

- hand-written ``lax.scan`` + optax loop of the 1-sample reparameterized ELBO (the limit for the
  estimator: nothing but the math, compiled once);
- NumPyro SVI (AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal), its ``update``
  run under ``lax.scan``, compiled once;
- BlackJAX ``meanfield_vi``, ``fullrank_vi`` and ``pathfinder``, when installed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.distributions import constraints

from benchmarks.gauss import kl_to_exact
from benchmarks.timing import block, now


def blackjax_available() -> str | None:
    """BlackJAX's version, or None when it is not installed (it is an optional extra)."""
    try:
        import blackjax

        return getattr(blackjax, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


@dataclasses.dataclass
class Method:
    """One way to fit: ``init(key) -> state``; ``chunk(state, key) -> (state, losses)`` runs
    ``chunk_steps`` optimizer steps (compiled once); ``to_q(state)`` is q as a numpyro dist.

    ``one_shot`` methods (Pathfinder) do all their work in ``init``.
    """

    name: str
    family: str
    init: Callable
    chunk: Callable | None
    to_q: Callable
    chunk_steps: int = 0
    grads_per_step: int = 1
    settings: dict = dataclasses.field(default_factory=dict)
    one_shot: bool = False


# --------------------------------------------------------------------------------------------
# Hand-written lax.scan + optax loop (same estimator and parameterization as vi_engine's)
# --------------------------------------------------------------------------------------------
class MFParams(NamedTuple):
    loc: jax.Array
    log_scale: jax.Array


def handwritten_meanfield(log_density, dim, data=(), *, lr=1e-2, num_samples=1,
                          estimator="stl", init_scale=0.1, optimizer=None):
    """Mean-field Gaussian, ``loc + exp(log_scale) * eps``, Adam: written out by hand.

    ``optimizer``: an optax transformation (pass vi_engine's own, so both sides step alike);
    default ``optax.adam(lr)``. Returns ``(init(key) -> (params, opt_state),
    run(params, opt_state, key, data, steps), elbo_evals(params, key, data, n))``, jitted.
    """
    opt = optax.adam(lr) if optimizer is None else optimizer

    def init(key):
        del key
        p = MFParams(jnp.zeros((dim,)), jnp.full((dim,), math.log(init_scale)))
        return p, opt.init(p)

    def loss(p, key, data):
        eps = jax.random.normal(key, (num_samples, dim))
        z = p.loc + jnp.exp(p.log_scale) * eps
        q = jax.lax.stop_gradient(p) if estimator == "stl" else p
        log_q = jnp.sum(
            -0.5 * ((z - q.loc) / jnp.exp(q.log_scale)) ** 2
            - q.log_scale
            - 0.5 * math.log(2 * math.pi),
            -1,
        )
        log_p = jax.vmap(lambda zi: log_density(zi, *data))(z)
        return -jnp.mean(log_p - log_q)

    def step(carry, key, data):
        p, s = carry
        val, g = jax.value_and_grad(loss)(p, key, data)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), val

    def run(p, s, key, data, steps):
        keys = jax.random.split(key, steps)
        (p, s), losses = jax.lax.scan(lambda c, k: step(c, k, data), (p, s), keys)
        return p, s, losses

    def elbo_evals(p, key, data, n):
        keys = jax.random.split(key, n)
        return jax.vmap(lambda k: -loss(p, k, data))(keys)  # n one-draw estimates, batched

    return init, jax.jit(run, static_argnums=4), jax.jit(elbo_evals, static_argnums=3)


# --------------------------------------------------------------------------------------------
# NumPyro SVI
# --------------------------------------------------------------------------------------------
NUMPYRO_GUIDES = {
    "meanfield": "AutoNormal",
    "fullrank": "AutoMultivariateNormal",
    "lowrank": "AutoLowRankMultivariateNormal",
}


def numpyro_model(log_density, dim):
    """A NumPyro model whose posterior over ``z`` is ``exp(log_density(z, *data))``."""

    def model(*data):
        z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (dim,)))
        numpyro.factor("log_density", log_density(z, *data))

    return model


def numpyro_svi(log_density, dim, family, *, optimizer=None, num_particles=1, guide_kwargs=None):
    """``(svi, guide)`` for ``family``; defaults: guide defaults, Trace_ELBO(1), Adam(1e-2)."""
    from numpyro.infer import SVI, Trace_ELBO, autoguide

    model = numpyro_model(log_density, dim)
    guide = getattr(autoguide, NUMPYRO_GUIDES[family])(model, **(guide_kwargs or {}))
    optimizer = numpyro.optim.Adam(1e-2) if optimizer is None else optimizer
    elbo = Trace_ELBO(num_particles=num_particles)
    if num_particles > 1:
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    return SVI(model, guide, optimizer, elbo), guide


def numpyro_q(svi, guide, state):
    params = svi.get_params(state)
    if type(guide).__name__ == "AutoNormal":
        return dist.Normal(params["z_auto_loc"], params["z_auto_scale"]).to_event(1)
    return guide.get_posterior(params)


def numpyro_method(problem, family, *, chunk_steps, tuned=False, max_steps=5000) -> Method:
    """NumPyro SVI with its defaults, or with a fair tuned setting (``tuned=True``):
    Adam 5e-2 decaying exponentially to 5e-4 over ``max_steps``, 8 vectorized particles,
    ``init_loc_fn=init_to_median``-free zero start is not available for ImproperUniform, so the
    default ``init_to_uniform`` is kept in both."""
    if tuned:
        sched = optax.exponential_decay(5e-2, transition_steps=max_steps, decay_rate=1e-2)
        opt = numpyro.optim.optax_to_numpyro(optax.adam(sched))
        particles = 8
        settings = {"optimizer": "adam(5e-2 -> 5e-4 exp decay over max_steps)",
                    "num_particles": particles, "loss": "Trace_ELBO(vectorized)"}
    else:
        opt, particles = None, 1
        settings = {"optimizer": "numpyro.optim.Adam(1e-2)", "num_particles": 1,
                    "loss": "Trace_ELBO()", "guide": "defaults (init_scale=0.1, init_to_uniform)"}
    svi, guide = numpyro_svi(problem.log_density, problem.dim, family, optimizer=opt,
                             num_particles=particles)
    data = problem.data

    @jax.jit
    def chunk(state, data):
        return jax.lax.scan(lambda s, _: svi.update(s, *data), state, None, length=chunk_steps)

    return Method(
        name=f"numpyro.{NUMPYRO_GUIDES[family]}" + (" tuned" if tuned else ""),
        family=family,
        init=lambda key: svi.init(key, *data),
        chunk=lambda state, key: chunk(state, data),
        to_q=lambda state: numpyro_q(svi, guide, state),
        chunk_steps=chunk_steps,
        grads_per_step=particles,
        settings=settings,
    )


# --------------------------------------------------------------------------------------------
# BlackJAX
# --------------------------------------------------------------------------------------------
def blackjax_method(problem, family, *, chunk_steps, lr=1e-2, num_samples=100) -> Method:
    """``blackjax.meanfield_vi`` / ``fullrank_vi`` with Adam(lr), ``num_samples`` draws, STL
    (its default), started at zero mean as BlackJAX does."""
    import blackjax

    logdensity = problem.logp
    opt = optax.adam(lr)
    ctor = {"meanfield": blackjax.meanfield_vi, "fullrank": blackjax.fullrank_vi}[family]
    algo = ctor(logdensity, opt, num_samples)
    dim = problem.dim

    @jax.jit
    def chunk(state, key):
        keys = jax.random.split(key, chunk_steps)
        return jax.lax.scan(lambda s, k: algo.step(k, s), state, keys)

    def to_q(state):
        if family == "meanfield":
            return dist.Normal(state.mu, jnp.exp(state.rho)).to_event(1)
        from blackjax.vi.fullrank_vi import _unflatten_cholesky

        return dist.MultivariateNormal(state.mu,
                                       scale_tril=_unflatten_cholesky(state.chol_params, dim))

    return Method(
        name=f"blackjax.{family}_vi",
        family=family,
        init=lambda key: algo.init(jnp.zeros((dim,))),
        chunk=chunk,
        to_q=to_q,
        chunk_steps=chunk_steps,
        grads_per_step=num_samples,
        settings={"optimizer": f"optax.adam({lr})", "num_samples": num_samples, "stl": True},
    )


def pathfinder_method(problem, *, num_samples=200, maxiter=30, maxcor=10) -> Method:
    """Single-path Pathfinder (Zhang et al. 2022): L-BFGS, then the best Gaussian on the path.

    Its q is ``N(x + Σ g, Σ)``, ``Σ = diag(α) + β γ βᵀ`` (blackjax ``bfgs_sample``), so
    KL(q‖p*) is closed form.
    """
    import blackjax

    dim = problem.dim

    @jax.jit
    def approx(key):
        state, info = blackjax.vi.pathfinder.approximate(
            key, problem.logp, jnp.zeros((dim,)), num_samples=num_samples, maxiter=maxiter,
            maxcor=maxcor,
        )
        return state

    def to_q(state):
        cov = jnp.diag(state.alpha) + state.beta @ state.gamma @ state.beta.T
        mean = (
            state.position
            + state.alpha * state.grad_position
            + state.beta @ (state.gamma @ (state.beta.T @ state.grad_position))
        )
        return dist.MultivariateNormal(mean, covariance_matrix=cov)

    return Method(
        name="blackjax.pathfinder" + ("" if maxcor == 10 else f" maxcor={maxcor}"),
        family="pathfinder",
        init=approx,
        chunk=None,
        to_q=to_q,
        settings={"num_samples": num_samples, "maxiter": maxiter, "maxcor": maxcor},
        one_shot=True,
    )


# --------------------------------------------------------------------------------------------
# Trajectory: KL(q‖p*) against wall time, compile included, then steady state
# --------------------------------------------------------------------------------------------
def run_trajectory(method: Method, problem, *, max_steps: int, targets: dict[str, float],
                   key=None, steady: bool = True) -> dict[str, Any]:
    """Run ``method`` on ``problem`` chunk by chunk, recording KL(q‖p*) after each chunk.

    The clock runs through init (tracing, compiling) and every chunk, and stops while KL(q‖p*)
    is evaluated. The run stops when KL ≤ the smallest target or at ``max_steps``. With
    ``steady`` the same (deterministic) run is repeated with everything compiled, without KL
    evaluations, to give the steady-state time to each target.

    ``targets``: label -> KL level; returns times to reach each ("never reached" is ``None``).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    lowest = min(targets.values()) if targets else -math.inf
    curve = []  # (seconds, steps, kl)
    elapsed = 0.0
    t0 = now()
    state = block(method.init(key))
    elapsed += now() - t0
    steps = 0
    if method.one_shot:
        kl, _ = kl_to_exact(method.to_q(state), problem.posterior)
        curve.append((elapsed, 0, kl))
    else:
        ck = key
        while steps < max_steps:
            ck, sub = jax.random.split(ck)
            t0 = now()
            state, losses = block(method.chunk(state, sub))
            elapsed += now() - t0
            steps += method.chunk_steps
            kl, _ = kl_to_exact(method.to_q(state), problem.posterior)
            if not math.isfinite(kl):
                kl = math.inf
            curve.append((elapsed, steps, kl))
            if kl <= lowest or not math.isfinite(kl):
                break
    out = {
        "method": method.name,
        "family": method.family,
        "settings": method.settings,
        "grads_per_step": method.grads_per_step,
        "curve": {"seconds": [c[0] for c in curve], "steps": [c[1] for c in curve],
                  "kl": [c[2] for c in curve]},
        "kl_final": curve[-1][2],
        "kl_best": min(c[2] for c in curve),
        "steps_run": steps,
        "seconds_total": elapsed,
        "reached": {},
    }
    for label, level in targets.items():
        hit = next((c for c in curve if c[2] <= level), None)
        out["reached"][label] = (
            None if hit is None else {"level": level, "seconds_cold": hit[0], "steps": hit[1]}
        )
    if steady:
        _steady(method, key, out)
    return out


def _steady(method: Method, key, out) -> None:
    """Repeat the run compiled (same keys, same trajectory) and time it to each target."""
    need = [r["steps"] for r in out["reached"].values() if r is not None]
    # Nothing reached: a short rerun is enough for the steady steps/s.
    last = max(need) if need else min(out["steps_run"], 4 * method.chunk_steps)
    t0 = now()
    state = block(method.init(key))
    times = {0: now() - t0}
    if not method.one_shot:
        ck, steps = key, 0
        while steps < last:
            ck, sub = jax.random.split(ck)
            state, _ = block(method.chunk(state, sub))
            steps += method.chunk_steps
            times[steps] = now() - t0
    for r in out["reached"].values():
        if r is not None:
            r["seconds_steady"] = times.get(r["steps"])
    sps = None
    if not method.one_shot and last:
        sps = last / max(times[last] - times[0], 1e-12)
        out["steps_per_second_steady"] = sps
    # The steady curve: init, then the measured steady rate (measured, not re-run, past `last`).
    out["curve"]["seconds_steady"] = [
        times[0] + (s / sps if sps else 0.0) for s in out["curve"]["steps"]
    ]
