"""vi_engine's programs must not run two batched factorizations of a target at once.

jaxlib 0.10's batched LAPACK kernels deadlock XLA's CPU thread pool when two run side by side
(``vi_engine._compile.after``). A target whose density factors a matrix, here a Gaussian
process's marginal likelihood over 120 points, is evaluated over batches of draws by the
end-of-fit check and by the mean's polish. Before those evaluations were chained, 7 of 8
mean-field fits of this target hung in the check. Each program runs in a fresh process pinned to
two cores (XLA sizes its pool by the CPU affinity, and CI has two), under a timeout, so a
regression fails here instead of hanging the suite.
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

    target = vi.Target.from_log_density(gp, 3, data=(x, y))
    family = F.get_family(sys.argv[1])
    params = family.init(jax.random.key(1), 3, jnp.float32)
    params = params._replace(loc=jnp.array([0.5, 0.0, -1.3]))
    if sys.argv[2] == "check":
        program = F._compiled_check(family, False)
    else:
        program = F._compiled_polish(family)
    for i in range(int(sys.argv[3])):
        out = jax.block_until_ready(program(jax.random.key(i), params, target))
    print("finished", jax.tree_util.tree_leaves(out)[0])
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
@pytest.mark.parametrize("family,program,runs", [
    ("meanfield", "check", 10),
    ("lowrank", "check", 10),
    ("meanfield", "polish", 1),
])
def test_batched_evaluations_of_a_factorizing_target_finish(family, program, runs):
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, family, program, str(runs)],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{family} {program}: still running after {TIMEOUT} s (the LAPACK deadlock)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished" in proc.stdout
