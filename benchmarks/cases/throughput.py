"""Throughput: optimization steps/s and ELBO evaluations/s, logistic regression, mean-field.

Same estimator on every side where it can be: 1-sample reparameterized ELBO with the STL gradient
(vi_engine's default), the very same optax object ``vi.default_optimizer(0.05)`` (Adam, b2=0.99)
for all three, zero mean and scale 0.1 at start, a fixed number of steps (``tol=None``).

- ``vi_engine``: ``vi.fit(target, "meanfield", key=..., num_steps=S, tol=None, progress=False,
  num_elbo_samples=0)`` — the public call, timed whole (init, loop, posterior; no final ELBO
  estimate, as on the other sides).
- ``hand-written scan``: ``lax.scan`` + optax of the same estimator, one jitted call (the limit).
- ``numpyro SVI scan``: ``svi.update`` under ``lax.scan``, jitted once (AutoNormal, Trace_ELBO
  with 1 particle, ``optax_to_numpyro`` of the same optimizer); its estimator keeps the score
  term (no STL).

ELBO evaluations: 1-draw ELBO estimates per second, ``elbo_batch`` of them per call
(``vi.elbo`` with ``num_samples=elbo_batch``; the scan loop's own estimator under ``lax.map``;
numpyro's ``Trace_ELBO(num_particles=elbo_batch, vectorize_particles=True).loss``).
"""

from __future__ import annotations

import jax
import numpyro

from benchmarks import methods, problems
from benchmarks.timing import log, measure_many

NAME = "throughput"


def run(cfg, ctx) -> dict:
    import vi_engine as vi

    repeat = cfg["repeat"] + 4  # cheap calls: more rounds, steadier medians
    cfg = cfg["throughput"]
    lr = cfg["learning_rate"]
    K = cfg["elbo_batch"]
    rows, data, checks = [], [], []
    for n, d in cfg["sizes"]:
        steps = cfg["steps"][n]
        p = problems.logistic_regression(0, n, d)
        log(f"throughput: logistic N={n} d={d}, {steps} steps")
        key = jax.random.key(0)
        opt = vi.default_optimizer(lr)  # one optax object, used by all three
        entry = {"n": n, "d": d, "steps": steps, "elbo_batch": K, "methods": {}}

        # vi_engine
        fam = vi.get_family("meanfield")
        fit = lambda: vi.fit(p.target, "meanfield", key=key, num_steps=steps, tol=None,
                             progress=False, optimizer=opt, num_elbo_samples=0).params
        params = vi.fit(p.target, "meanfield", key=key, num_steps=10, tol=None,
                        progress=False, optimizer=opt, num_elbo_samples=1).params
        elbo_fn = jax.jit(lambda k, prm, t: vi.elbo(k, fam, prm, t, K, batch_size=K).mean)

        # hand-written lax.scan + optax
        init, run_scan, elbo_evals = methods.handwritten_meanfield(
            problems.logistic_log_density, d, lr=lr, optimizer=opt)
        prm, st = init(key)

        # numpyro SVI: update under lax.scan, compiled once
        svi, guide = methods.numpyro_svi(problems.logistic_log_density, d, "meanfield",
                                         optimizer=numpyro.optim.optax_to_numpyro(opt))
        state = svi.init(jax.random.key(1), *p.data)

        @jax.jit
        def svi_scan(state, data):
            return jax.lax.scan(lambda s, _: svi.update(s, *data), state, None, length=steps)

        from numpyro.infer import Trace_ELBO

        loss = Trace_ELBO(num_particles=K, vectorize_particles=True)
        np_params = svi.get_params(state)
        np_elbo = jax.jit(lambda k, prm, data: loss.loss(k, prm, svi.model, svi.guide, *data))

        # Interleaved rounds: every method once per round, medians over rounds.
        st_steps = measure_many({
            "vi_engine": fit,
            "hand-written scan": lambda: run_scan(prm, st, key, p.data, steps),
            "numpyro SVI scan": lambda: svi_scan(state, p.data),
        }, repeat=repeat, min_seconds=cfg.get("min_seconds", 0.0))
        st_elbo = measure_many({
            "vi_engine": lambda: elbo_fn(key, params, p.target),
            "hand-written scan": lambda: elbo_evals(prm, key, p.data, K),
            "numpyro SVI scan": lambda: np_elbo(key, np_params, p.data),
        }, repeat=repeat, min_seconds=cfg.get("min_seconds", 0.0))
        for name in st_steps:
            entry["methods"][name] = _rates(st_steps[name], st_elbo[name], steps, K)

        e = entry["methods"]
        r_scan = e["vi_engine"]["steps_per_s"] / e["hand-written scan"]["steps_per_s"]
        r_np = e["vi_engine"]["steps_per_s"] / e["numpyro SVI scan"]["steps_per_s"]
        entry["ratio_vs_scan"], entry["ratio_vs_numpyro"] = r_scan, r_np
        for name, m in e.items():
            rows.append([n, d, name, m["steps_per_s"], m["elbo_evals_per_s"], m["first_s"],
                         m["median_s"], e["vi_engine"]["steps_per_s"] / m["steps_per_s"]])
        if (n, d) in ((100, 5), (10_000, 20)):
            checks.append({"name": f"logistic N={n} d={d}: vi_engine steps/s vs hand-written "
                                   "lax.scan", "value": r_scan, "bar": ">= 0.9",
                           "pass": r_scan >= 0.9})
            bar = 2.0 if n == 100 else 1.0
            checks.append({"name": f"logistic N={n} d={d}: vi_engine steps/s vs NumPyro SVI "
                                   "update under lax.scan", "value": r_np,
                           "bar": ">= 1.0" + (" (aim 2.0)" if n == 100 else ""),
                           "pass": r_np >= 1.0, "aim": bar})
        data.append(entry)
    return {
        "name": NAME,
        "table": {
            "title": "Throughput, logistic regression, mean-field, 1 sample, "
                     "vi.default_optimizer(0.05) on all sides, fixed steps (steady, median of "
                     "interleaved rounds)",
            "columns": ["N", "d", "method", "steps/s", "ELBO evals/s", "first call s",
                        "median s", "vi_engine / this"],
            "rows": rows,
        },
        "checks": checks,
        "data": {"sizes": data, "settings": cfg},
    }


def _rates(m_steps, m_elbo, steps, k):
    return {
        "steps_per_s": steps / m_steps["median"],
        "elbo_evals_per_s": k / m_elbo["median"],
        "first_s": m_steps["first"],
        "median_s": m_steps["median"],
        "times_s": m_steps["times"],
        "elbo_median_s": m_elbo["median"],
    }
