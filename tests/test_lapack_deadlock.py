"""vi_engine's programs must not run two batched LAPACK calls at once.

jaxlib 0.10's batched LAPACK kernels deadlock XLA's CPU thread pool when two run side by side
(``vi_engine._compile.after``). Cases found hanging, each run here in a fresh process pinned to
two cores (XLA sizes its pool by the CPU affinity, and CI has two), under a timeout, so a
regression fails instead of hanging the suite:

- the end-of-fit check of a target that factors a matrix (a Gaussian process's marginal
  likelihood over 120 points), for one problem (7 of 8 mean-field fits hung) and for a batch
  (``fit_many``: 2 of 4 hung, the mean gap's Hessian vmapped over problems);
- the KL of 10^4 pairs of low-rank Gaussians (3 of 3 hung).
"""

import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 240  # seconds; each process takes 5-10 s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib, os, sys
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:2])
    import jax, jax.numpy as jnp
    import vi_engine as vi
    F = importlib.import_module("vi_engine.fit")

    x = jnp.linspace(0.0, 10.0, 120)
    y = jnp.sin(x) + 0.3 * jax.random.normal(jax.random.key(0), (120,))

    def gp(z, x, y):
        ell, amp, noise = jnp.exp(z[0]), jnp.exp(z[1]), jnp.exp(z[2])
        k = amp**2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell**2)
        lo = jnp.linalg.cholesky(k + (noise**2 + 1e-4) * jnp.eye(x.shape[0]))
        a = jax.scipy.linalg.solve_triangular(lo, y, lower=True)
        return -0.5 * a @ a - jnp.sum(jnp.log(jnp.diag(lo))) - 0.5 * jnp.sum(z**2)

    family = F.get_family(sys.argv[1])
    params = family.init(jax.random.key(1), 3, jnp.float32)
    params = params._replace(loc=jnp.array([0.5, 0.0, -1.3]))
    if sys.argv[2] == "check":
        target = vi.Target.from_log_density(gp, 3, data=(x, y))
        args = (target,)
        program = F._compiled_check(family, False)
    elif sys.argv[2] == "check_many":
        targets = jax.vmap(lambda yi: vi.Target.from_log_density(gp, 3, data=(x, yi)))(
            jnp.stack([y, -y]))
        params = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), params)
        args = (targets,)
        program = jax.jit(lambda k, p, t: F._compiled_check(family, True)(
            jax.random.split(k, 2), p, t))
    else:  # kl
        import numpyro.distributions as dist

        def lowrank(k):
            k1, k2, k3 = jax.random.split(k, 3)
            d = dist.LowRankMultivariateNormal(
                jax.random.normal(k1, (10_000, 64)), 0.3 * jax.random.normal(k2, (10_000, 64, 16)),
                jnp.exp(0.1 * jax.random.normal(k3, (10_000, 64))))
            # numpyro factors the capacitance in __init__: two such eager calls dispatched back
            # to back can deadlock too (outside vi_engine), so each is waited for.
            jax.block_until_ready(d._capacitance_tril)
            return d

        p, q = lowrank(jax.random.key(2)), lowrank(jax.random.key(3))
        kl = jax.jit(vi.kl_divergence)
        program = lambda k, *_: kl(p, q)
        args = ()
    for i in range(int(sys.argv[3])):
        out = jax.block_until_ready(program(jax.random.key(i), params, *args))
    print("finished", jax.tree_util.tree_leaves(out)[0])
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
@pytest.mark.parametrize("family,program,runs", [
    ("meanfield", "check", 4),
    ("lowrank", "check", 4),
    ("meanfield", "check_many", 4),
    ("meanfield", "kl", 3),
])
def test_batched_evaluations_of_a_factorizing_target_finish(family, program, runs):
    # Without the test run's XLA_FLAGS (LLVM -O0: these programs run repeatedly, 3x slower
    # there); the deadlock does not depend on the optimization level.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, family, program, str(runs)],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{family} {program}: still running after {TIMEOUT} s (the LAPACK deadlock)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout
