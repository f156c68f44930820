"""``vi.fit_many``: B small logistic regressions (N=50, d=3) fitted in one compiled call.

- ``vi_engine fit_many``: ``vi.fit_many(make_target, X, Y, family="meanfield", num_steps=S,
  tol=None, progress=False, num_elbo_samples=0)``: the same work as the NumPyro side (fit and
  return the parameters; the posterior distribution is built too, no final ELBO estimate).
- ``numpyro vmap``: hand-written ``jax.jit(jax.vmap(init + lax.scan(svi.update)))`` of NumPyro
  SVI (AutoNormal, Trace_ELBO(1), ``optax_to_numpyro(vi.default_optimizer(0.05))``, the same
  optimizer as vi_engine's): the best a NumPyro user can write by hand.
- ``numpyro svi.run loop``: a Python loop of ``svi.run`` (each call compiles again), timed on a
  few problems and extrapolated to B (marked "estimated").

"first" is a call from cold (trace + compile + run), the median of ``first_call_rounds``
interleaved rounds, each after ``jax.clear_caches()``; "steady" the median of repeated calls.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from benchmarks import methods, problems
from benchmarks.timing import log, measure_first_calls, measure_many, timed_call

NAME = "fit_many"
LR = 0.05


def _data(b, n, d):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, n, d)).astype(np.float32)
    w = rng.standard_normal((b, d)).astype(np.float32)
    p = 1 / (1 + np.exp(-np.einsum("bnd,bd->bn", x, w)))
    y = (rng.uniform(size=(b, n)) < p).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def run(cfg, ctx) -> dict:
    import vi_engine as vi

    repeat = max(2, cfg["repeat"] // 2)
    cfg = cfg["fit_many"]
    n, d, steps = cfg["n"], cfg["d"], cfg["steps"]
    opt = vi.default_optimizer(LR)

    def make_target(x, y):
        return vi.Target.from_log_density(problems.logistic_log_density, d, data=(x, y))

    svi, guide = methods.numpyro_svi(problems.logistic_log_density, d, "meanfield",
                                     optimizer=numpyro.optim.optax_to_numpyro(opt))

    def one(key, x, y):
        state = svi.init(key, x, y)
        state, _ = jax.lax.scan(lambda s, _: svi.update(s, x, y), state, None, length=steps)
        return svi.get_params(state)

    np_vmap = jax.jit(jax.vmap(one))

    # Python loop of svi.run: per-problem time from a few problems, extrapolated to B.
    xs, ys = _data(max(cfg["python_loop_problems"], 1), n, d)
    loop_times = []
    for i in range(cfg["python_loop_problems"]):
        _, t = timed_call(lambda: svi.run(jax.random.key(i), steps, xs[i], ys[i],
                                          progress_bar=False).params)
        loop_times.append(t)
    per_problem = statistics.median(loop_times)
    log(f"fit_many: svi.run per problem {per_problem:.2f}s (from {len(loop_times)} problems)")

    rows, data, checks = [], [], []
    for b in cfg["batches"]:
        log(f"fit_many: B={b}")
        x, y = _data(b, n, d)
        key = jax.random.key(0)
        eng = lambda: vi.fit_many(make_target, x, y, family="meanfield", key=key,
                                  num_steps=steps, tol=None, progress=False, optimizer=opt,
                                  num_elbo_samples=0).params
        keys = jax.random.split(jax.random.key(1), b)
        fns = {"eng": eng, "np": lambda: np_vmap(keys, x, y)}
        cold = measure_first_calls(fns, rounds=cfg.get("first_call_rounds", 1))
        st = measure_many(fns, repeat=repeat)
        m_eng, m_np = st["eng"], st["np"]
        m_eng["first"], m_np["first"] = cold["eng"]["median"], cold["np"]["median"]
        m_eng["first_times"], m_np["first_times"] = cold["eng"]["times"], cold["np"]["times"]
        entry = {
            "B": b,
            "vi_engine fit_many": {"first_s": m_eng["first"], "steady_s": m_eng["median"],
                                   "first_s_rounds": m_eng["first_times"]},
            "numpyro vmap": {"first_s": m_np["first"], "steady_s": m_np["median"],
                             "first_s_rounds": m_np["first_times"]},
            "numpyro svi.run loop (estimated)": {"first_s": per_problem * b,
                                                 "steady_s": per_problem * b,
                                                 "estimated_from": len(loop_times)},
        }
        for name in ("vi_engine fit_many", "numpyro vmap", "numpyro svi.run loop (estimated)"):
            m = entry[name]
            m["problems_per_s"] = b / m["steady_s"]
            rows.append([b, name, m["first_s"], m["steady_s"], m["problems_per_s"],
                         b * steps / m["steady_s"]])
        ratio = m_np["first"] / m_eng["first"]
        entry["speedup_vs_numpyro_vmap_first"] = ratio
        if b == 1000:
            rounds = len(m_eng["first_times"])
            checks.append({"name": f"fit_many B=1000 (N={n}, d={d}, {steps} steps), incl. "
                                   f"compile (median of {rounds} cold calls): vi_engine "
                                   f"{m_eng['first']:.2f}s vs numpyro vmap "
                                   f"{m_np['first']:.2f}s", "value": ratio,
                           "bar": ">= 1.0 (numpyro time / vi_engine time)",
                           "pass": ratio >= 1.0})
        data.append(entry)
    return {
        "name": NAME,
        "table": {
            "title": f"fit_many: B logistic regressions (N={n}, d={d}), mean-field, {steps} "
                     "steps, vi.default_optimizer(0.05); svi.run loop extrapolated from "
                     f"{len(loop_times)} problems",
            "columns": ["B", "method", "first call s", "steady s", "problems/s",
                        "problem-steps/s"],
            "rows": rows,
        },
        "checks": checks,
        "data": {"batches": data, "svi_run_per_problem_s": loop_times, "settings": cfg},
    }
