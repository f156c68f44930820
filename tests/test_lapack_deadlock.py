"""vi_engine's programs must not run two batched LAPACK calls at once.

jaxlib 0.10's batched LAPACK kernels deadlock XLA's CPU thread pool when two run side by side
(``vi_engine._compile.after``). Cases found hanging, run here one after another in a fresh
process pinned to two cores (XLA sizes its pool by the CPU affinity, and CI has two), under a
timeout, so a regression fails instead of hanging the suite:

- the end-of-fit check of a target that factors a matrix (a Gaussian process's marginal
  likelihood over 120 points), for one problem (7 of 8 mean-field fits hung) and for a batch
  (``fit_many``: 2 of 4 hung, the mean gap's Hessian vmapped over problems);
- the KL of 10^4 pairs of low-rank Gaussians (3 of 3 hung). Here 4,000 pairs, which cost less
  to draw, factor and compile for: without ``_compile.after``, 3 evaluations of the KL hung 2 of
  3 times there and 8 evaluations 4 of 4 times, 3 evaluations of its gradient 3 of 3 times (at
  500 pairs the KL finished), so the cases run 8 and 4;
- its gradient (2 of 2 hung, against a low-rank q and against a full-rank q alike): the
  transposes of p's and q's factorizations, and JAX's two solves for one triangular solve's
  gradient, side by side.

The last test reads the compiled programs instead: in the KL and its gradient, every pair of
LAPACK calls is ordered by a data path (15 pairs of 9 calls were not, low-rank against low-rank).
"""

import itertools
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import vi_engine as vi

TIMEOUT = 300  # seconds; the five cases take 25-40 s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib, os, sys
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:2])
    import numpy as np
    import jax, jax.numpy as jnp
    import vi_engine as vi
    F = importlib.import_module("vi_engine.fit")

    # The inputs are drawn with NumPy: jax.random's draws of these shapes compiled programs of
    # their own (2 s for the low-rank ones), which the cases do not need.
    rng = np.random.default_rng(0)
    x = jnp.linspace(0.0, 10.0, 120)
    y = jnp.asarray(np.sin(np.asarray(x)) + 0.3 * rng.standard_normal(120), jnp.float32)

    PAIRS = 4_000

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def gp(z, x, y):
        ell, amp, noise = jnp.exp(z[0]), jnp.exp(z[1]), jnp.exp(z[2])
        k = amp**2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell**2)
        lo = jnp.linalg.cholesky(k + (noise**2 + 1e-4) * jnp.eye(x.shape[0]))
        a = jax.scipy.linalg.solve_triangular(lo, y, lower=True)
        return -0.5 * a @ a - jnp.sum(jnp.log(jnp.diag(lo))) - 0.5 * jnp.sum(z**2)

    def run(family_name, what, runs):
        family = F.get_family(family_name)
        params = family.init(jax.random.key(1), 3, jnp.float32)
        params = params._replace(loc=jnp.array([0.5, 0.0, -1.3]))
        if what == "check":
            target = vi.Target.from_log_density(gp, 3, data=(x, y))
            args = (target,)
            program = F._compiled_check(family, False)
        elif what == "check_many":
            targets = jax.vmap(lambda yi: vi.Target.from_log_density(gp, 3, data=(x, yi)))(
                jnp.stack([y, -y]))
            params = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), params)
            args = (targets,)
            program = jax.jit(lambda k, p, t: F._compiled_check(family, True)(
                jax.random.split(k, 2), p, t))
        elif what == "kl":
            import numpyro.distributions as dist

            def lowrank():
                d = dist.LowRankMultivariateNormal(
                    normal(PAIRS, 64), normal(PAIRS, 64, 16, scale=0.3),
                    jnp.exp(normal(PAIRS, 64, scale=0.1)))
                # numpyro factors the capacitance in __init__: two such eager calls dispatched
                # back to back can deadlock too (outside vi_engine), so each is waited for.
                jax.block_until_ready(d._capacitance_tril)
                return d

            p, q = lowrank(), lowrank()
            kl = jax.jit(vi.kl_divergence)
            program = lambda k, *_: kl(p, q)
            args = ()
        else:  # kl_grad: the distributions built in the program (numpyro's eager calls traced)
            import numpyro.distributions as dist

            def lowrank():
                return (normal(PAIRS, 64), normal(PAIRS, 64, 16, scale=0.3),
                        jnp.exp(normal(PAIRS, 64, scale=0.1)))

            def total(a, b):
                p, q = dist.LowRankMultivariateNormal(*a), dist.LowRankMultivariateNormal(*b)
                return jnp.sum(vi.kl_divergence(p, q))

            grad = jax.jit(jax.grad(total, argnums=(0, 1)))
            a, b = lowrank(), lowrank()
            program = lambda k, *_: grad(a, b)
            args = ()
        for i in range(runs):
            out = jax.block_until_ready(program(jax.random.key(i), params, *args))
        return float(jnp.ravel(jax.tree_util.tree_leaves(out)[0])[0])

    for case in sys.argv[1:]:
        family_name, what, runs = case.split(":")
        print("started", case, flush=True)
        print("finished", case, run(family_name, what, int(runs)), flush=True)
""")


CASES = ["meanfield:check:4", "lowrank:check:4", "meanfield:check_many:4", "meanfield:kl:8",
         "meanfield:kl_grad:4"]  # family:program:runs


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity")
def test_batched_evaluations_of_a_factorizing_target_finish():
    # The cases one after another in one process (each in its own took 4-10 s, 1.5-2 of them
    # starting Python and importing), under one timeout; a hang names the case it stopped in.
    # Without the test run's XLA_FLAGS (LLVM -O0: these programs run repeatedly, 3x slower
    # there); the deadlock does not depend on the optimization level.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, *CASES], cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        started = [line.split()[1] for line in out.splitlines() if line.startswith("started")]
        pytest.fail(f"{started[-1] if started else 'start-up'}: still running after {TIMEOUT} s "
                    "(the LAPACK deadlock)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines()
            if line.startswith("finished")] == CASES, proc.stdout


def _unordered_lapack_pairs(hlo):
    """Pairs of LAPACK calls in an optimized HLO module's computations with no data path
    between them (either way), and how many calls there are."""
    computations, current = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = {}
            computations.append(current)
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
        if m and current is not None:
            current[m.group(1)] = (m.group(2), re.findall(r"%([\w.\-]+)", m.group(2)))
    calls, unordered = 0, []
    for ins in computations:
        lapack = [n for n, (text, _) in ins.items() if "custom-call" in text and "lapack" in text]
        calls += len(lapack)
        upstream = {}

        def above(name):
            if name not in upstream:
                upstream[name] = set()  # (no cycles in HLO)
                for op in ins[name][1]:
                    if op in ins:
                        upstream[name] |= {op} | above(op)
            return upstream[name]

        unordered += [(a, b) for a, b in itertools.combinations(lapack, 2)
                      if a not in above(b) and b not in above(a)]
    return calls, unordered


def _hlo_only(xla_defaults):
    """XLA's default compilation but for LLVM's optimization level, which shapes the machine code
    only: the optimized HLO read here came out the same text at -O0 and -O3 (low-rank KL and its
    gradient, measured), at 0.2 and 0.5 s of compiling instead of 0.3 and 0.85 s."""
    return {**xla_defaults, "xla_backend_optimization_level": 0}


# Rank 2: at d = 4 low-rank pairs go the dense way (rank >= d/2, kl._kl_gauss), at d = 6
# Woodbury's.
@pytest.mark.parametrize("kinds,d", [(("lowrank", "lowrank"), 6), (("lowrank", "full"), 6),
                                     (("full", "lowrank"), 6), (("lowrank", "diag"), 6),
                                     (("full", "full"), 6), (("lowrank", "lowrank"), 4),
                                     (("lowrank", "full"), 4), (("full", "lowrank"), 4)])
def test_every_lapack_call_of_the_kl_and_its_gradient_is_ordered(kinds, d, xla_defaults):
    r, b = 2, 8
    keys = iter(jax.random.split(jax.random.key(0), 6))

    def params(kind):
        loc = jax.random.normal(next(keys), (b, d))
        if kind == "lowrank":
            return loc, 0.5 * jax.random.normal(next(keys), (b, d, r)), jnp.ones((b, d))
        if kind == "full":
            return loc, jnp.tril(0.3 * jax.random.normal(next(keys), (b, d, d)), -1) + jnp.eye(d)
        return loc, jnp.exp(0.2 * jax.random.normal(next(keys), (b, d)))

    def build(kind, a):
        if kind == "lowrank":
            return dist.LowRankMultivariateNormal(*a)
        if kind == "full":
            return dist.MultivariateNormal(a[0], scale_tril=a[1])
        return dist.Normal(*a).to_event(1)

    def total(a, c):
        return jnp.sum(vi.kl_divergence(build(kinds[0], a), build(kinds[1], c)))

    args = (params(kinds[0]), params(kinds[1]))
    for what, f in (("KL", total), ("gradient", jax.grad(total, argnums=(0, 1)))):
        # As a user's jit compiles it (XLA's defaults, not make test's cheaper flags).
        hlo = jax.jit(f).lower(*args).compile(compiler_options=_hlo_only(xla_defaults)).as_text()
        calls, unordered = _unordered_lapack_pairs(hlo)
        assert calls >= 1, f"{what}: no LAPACK call found (did the HLO text format change?)"
        assert not unordered, f"{kinds} {what}: LAPACK calls side by side: {unordered}"


# (A full-rank final ELBO has one LAPACK call only here: XLA solves one of its two small
# triangular systems itself.)
@pytest.mark.parametrize("family,what", [
    ("lowrank", "final_elbo"), ("lowrank", "final_elbo_many"), ("lowrank", "step_gradient"),
    ("fullrank", "step_gradient"), ("lowrank", "kl_estimate"), ("fullrank", "kl_estimate")])
def test_every_lapack_call_of_a_target_beside_log_q_is_ordered(family, what, xla_defaults):
    # A Gaussian target solves a triangular system, and so does a full-rank or low-rank log q:
    # over many draws (and problems), side by side, they deadlocked fit_many's final ELBO (200
    # low-rank fits hung 5 of 12 runs, found in review). log q comes first, then the target
    # (objectives.log_weights); kl_estimate's log p, then log q. Each case failed before.
    import importlib

    F = importlib.import_module("vi_engine.fit")
    fam = vi.get_family(family)
    d, b = 6, 4
    a = jax.random.normal(jax.random.key(3), (d, d))
    cov = a @ a.T / d + jnp.eye(d)
    mus = jax.random.normal(jax.random.key(0), (b, d))
    targets = jax.vmap(lambda m: vi.exact.gaussian(m, cov).target)(mus)
    target = vi.exact.gaussian(mus[0], cov).target
    params = fam.init(jax.random.key(1), d)
    many = jax.tree_util.tree_map(lambda a: jnp.stack([a] * b), params)
    key = jax.random.key(2)
    if what == "final_elbo":
        f, args = F._compiled_estimate(fam, 1000, False), (key, params, target)
    elif what == "final_elbo_many":
        f = F._compiled_estimate(fam, 1000, True)
        args = (jax.random.split(key, b), many, targets)
    elif what == "step_gradient":  # the fit's step, over the problems of fit_many
        def loss(p, k, t):
            return vi.ELBO().loss(p, k, fam, t, 16)[0]

        f = jax.jit(jax.vmap(jax.grad(loss)))
        args = (many, jax.random.split(key, b), targets)
    else:
        q = fam.to_distribution(jax.tree_util.tree_map(lambda a: a + 0.1, many))
        p = fam.to_distribution(many)
        f, args = jax.jit(lambda k: vi.kl_estimate(p, q, k, 1000).mean), (key,)
    hlo = f.lower(*args).compile(compiler_options=_hlo_only(xla_defaults)).as_text()
    calls, unordered = _unordered_lapack_pairs(hlo)
    assert calls >= 2, f"{what}: {calls} LAPACK call(s) found (did the HLO text format change?)"
    assert not unordered, f"{family} {what}: LAPACK calls side by side: {unordered}"
