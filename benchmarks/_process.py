"""One whole process, timed from the first line: import, build the problem, compile, fit.

Run as a script (not ``-m benchmarks...``, which would import the suite first):

    python benchmarks/_process.py N D vi_engine fullrank
    python benchmarks/_process.py N D blackjax fullrank NUM_SAMPLES LR STEPS
    python benchmarks/_process.py N D numpyro fullrank NUM_PARTICLES LR STEPS
    python benchmarks/_process.py N D jax fullrank LR STEPS [jit|fast] [numpyro]

``jax`` is the floor reference: what a hand-written script of the same estimator costs (STL,
one draw per step, the same full-rank parameterization and initial scale as ``vi.FullRank``,
Adam with b2 = 0.99), with the advantages of hindsight: a step count and a cosine schedule
chosen knowing where KL(q‖p*) <= 1e-3 is reached, no stopping test, no NaN guard, no
posterior object (so no numpyro import), the whole loop one ``lax.scan`` in one program.
``jit`` (the default) compiles it as ``jax.jit`` does; ``fast`` with the cheaper XLA settings
vi_engine uses for small programs (LLVM -O1, XLA's classic emitters: ``vi_engine/_compile.py``).
``numpyro`` also imports ``numpyro.distributions`` (before the clock reads the import time), as
any engine whose posteriors are numpyro distributions must: the floor for vi_engine's API.

Every method fits the same log density (Bayesian linear regression, prior N(0, I), σ = 1, the
data of ``benchmarks.problems.linear_regression``). KL(q‖p*) is computed after the clock stops.
Prints one JSON line: ``{"seconds": ..., "import_seconds": ..., "kl": ..., ...}``.
"""

import time

T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402


def main(argv):
    n, d, lib, family = int(argv[0]), int(argv[1]), argv[2], argv[3]
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    y_np = x_np @ w + rng.standard_normal(n)
    x_np, y_np = x_np.astype(np.float32), y_np.astype(np.float32)

    import jax
    import jax.numpy as jnp

    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    def log_density(z, x, y):
        r = y - x @ z
        return -0.5 * jnp.sum(r**2) - 0.5 * jnp.sum(z**2)

    info = {"lib": lib, "family": family, "n": n, "d": d}
    if lib == "vi_engine":
        import vi_engine as vi

        t_imp = time.perf_counter() - T0
        target = vi.Target.from_log_density(log_density, d, data=(x, y))
        res = vi.fit(target, family, key=jax.random.key(0), progress=False)
        mean, cov = _moments(res.posterior)
        info["steps"] = int(res.num_steps)
    elif lib == "jax":
        import optax

        if "numpyro" in argv[7:]:
            import numpyro.distributions  # noqa: F401
        t_imp = time.perf_counter() - T0
        lr, steps = float(argv[4]), int(argv[5])
        compile_mode = argv[6] if len(argv) > 6 else "jit"
        mean, cov = _handwritten_fullrank(lambda z: log_density(z, x, y), d, lr, steps,
                                          compile_mode)
        info.update(steps=steps, lr=lr, schedule="cosine", compile=compile_mode)
    elif lib == "blackjax":
        import blackjax
        import optax

        t_imp = time.perf_counter() - T0
        ns, lr, steps = int(argv[4]), float(argv[5]), int(argv[6])
        ctor = {"meanfield": blackjax.meanfield_vi, "fullrank": blackjax.fullrank_vi}[family]
        algo = ctor(lambda z: log_density(z, x, y), optax.adam(lr), ns)

        @jax.jit
        def run(key):
            state = algo.init(jnp.zeros((d,)))
            keys = jax.random.split(key, steps)
            return jax.lax.scan(lambda s, k: algo.step(k, s), state, keys)[0]

        state = jax.block_until_ready(run(jax.random.key(0)))
        if family == "meanfield":
            mean, cov = np.asarray(state.mu), np.diag(np.exp(2 * np.asarray(state.rho)))
        else:
            from blackjax.vi.fullrank_vi import _unflatten_cholesky

            lo = np.asarray(_unflatten_cholesky(state.chol_params, d))
            mean, cov = np.asarray(state.mu), lo @ lo.T
        info.update(steps=steps, num_samples=ns, lr=lr)
    elif lib == "numpyro":
        import numpyro
        import numpyro.distributions as dist
        from numpyro.distributions import constraints
        from numpyro.infer import SVI, Trace_ELBO, autoguide

        t_imp = time.perf_counter() - T0
        particles, lr, steps = int(argv[4]), float(argv[5]), int(argv[6])

        def model(x, y):
            z = numpyro.sample("z", dist.ImproperUniform(constraints.real_vector, (), (d,)))
            numpyro.factor("lp", log_density(z, x, y))

        guide = {"meanfield": autoguide.AutoNormal,
                 "fullrank": autoguide.AutoMultivariateNormal}[family](model)
        svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=particles))
        res = svi.run(jax.random.key(0), steps, x, y, progress_bar=False)
        if family == "meanfield":
            mean = np.asarray(res.params["z_auto_loc"])
            cov = np.diag(np.asarray(res.params["z_auto_scale"]) ** 2)
        else:
            mean, cov = _moments(guide.get_posterior(res.params))
        info.update(steps=steps, num_particles=particles, lr=lr)
    else:
        raise SystemExit(f"unknown lib {lib!r}")
    seconds = time.perf_counter() - T0
    info["numpyro_imported"] = "numpyro" in sys.modules
    # Exact posterior (float64) and KL(q‖p*), after the clock.
    xd, yd = x_np.astype(np.float64), y_np.astype(np.float64)
    prec = np.eye(d) + xd.T @ xd
    lp = np.linalg.cholesky(prec)
    m_post = np.linalg.solve(prec, xd.T @ yd)
    info.update(seconds=seconds, import_seconds=t_imp,
                kl=_kl_q_p(np.asarray(mean, np.float64), np.asarray(cov, np.float64), m_post, lp))
    print(json.dumps(info))


def _handwritten_fullrank(log_density, d, lr, steps, compile_mode):
    import jax
    import jax.numpy as jnp
    import optax

    opt = optax.adam(optax.cosine_decay_schedule(lr, steps), b2=0.99)

    def scale_tril(p):
        return (jnp.eye(d) + jnp.tril(p["off"], -1)) * jnp.exp(p["logd"])[None, :]

    def loss(p, eps):  # STL: log q at stopped parameters, z reparameterized
        z = p["loc"] + scale_tril(p) @ eps
        ps = jax.lax.stop_gradient(p)
        u = jax.lax.linalg.triangular_solve(
            scale_tril(ps), (z - ps["loc"])[:, None], left_side=True, lower=True
        )
        return -(log_density(z) + 0.5 * jnp.sum(u**2) + jnp.sum(ps["logd"]))

    @jax.jit
    def run(key):
        p = {"loc": jnp.zeros(d), "logd": jnp.full(d, jnp.log(0.1)), "off": jnp.zeros((d, d))}
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(steps))

        def step(carry, k):
            p, s = carry
            g = jax.grad(loss)(p, jax.random.normal(k, (d,)))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        p = jax.lax.scan(step, (p, opt.init(p)), keys)[0][0]
        return p["loc"], scale_tril(p)

    key = jax.random.key(0)
    if compile_mode == "fast":
        options = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
        run = run.lower(key).compile(compiler_options=options)
    elif compile_mode != "jit":
        raise SystemExit(f"unknown compile mode {compile_mode!r}")
    mean, lo = (np.asarray(a) for a in run(key))
    return mean, lo @ lo.T


def _moments(d):
    import numpy as np

    if hasattr(d, "base_dist"):
        return np.asarray(d.base_dist.loc), np.diag(np.asarray(d.base_dist.scale) ** 2)
    return np.asarray(d.loc), np.asarray(d.covariance_matrix)


def _kl_q_p(mq, sq, mp, lprec):
    """KL(N(mq, sq) ‖ N(mp, Λ⁻¹)) with ``lprec`` the Cholesky factor of Λ."""
    k = mq.shape[0]
    lq = np.linalg.cholesky(sq)
    a = lprec.T @ lq  # Λ^{1/2}-whitened factor of sq
    diff = lprec.T @ (mq - mp)
    logdet_p = -2 * np.log(np.diag(lprec)).sum()
    logdet_q = 2 * np.log(np.diag(lq)).sum()
    return float(0.5 * ((a**2).sum() + diff @ diff - k + logdet_p - logdet_q))


if __name__ == "__main__":
    main(sys.argv[1:])
