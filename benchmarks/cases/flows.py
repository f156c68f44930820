"""Normalizing flow vs full-rank Gaussian (issue 7's acceptance numbers), public API only.

``vi.fit(target, "fullrank")`` and ``vi.fit(target, "flow")`` with their defaults (flow: Adam
1e-2, 16 draws per step; both with the default plateau stopping rule) on:

- 2-D targets (``vi.Target.from_log_density``): banana, Neal's funnel, a two-component mixture,
  a correlated Gaussian. All are normalized; log Z is also computed by grid quadrature (the
  funnel in (v, u = x·e^{-v/2}) so the neck is resolved) and KL(q‖p) ≈ log Z − ELBO.
- eight_schools_centered from posteriordb (``vi.Target.from_numpyro``; 10-D, log Z unknown, so
  ELBO only).

ELBO ± standard error from ``num_elbo_samples`` draws (``res.elbo``). Fit time is one cold call
(compile included). Checks: flow ELBO > full-rank ELBO on banana, funnel, mixture and eight
schools; |KL_flow − KL_fullrank| below a bar on the Gaussian (where full-rank is exact). With
``fixed_steps`` set (``--tiny``: a few steps, not converged) the checks are info only.
``tests/test_flow.py`` imports these log densities and quadrature helpers.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import log, timed_call

NAME = "flows"

_POSTERIORDB = pathlib.Path(__file__).resolve().parents[3] / "shared/reference/posteriordb"
_EIGHT_STEM = "eight_schools-eight_schools_centered"


# --- 2-D targets (normalized; vectorized over leading axes) ----------------------------------


def _norm_lp(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - jnp.log(s) - 0.5 * math.log(2 * math.pi)


def banana(z):
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1², 0.5²)."""
    return _norm_lp(z[..., 0], 0.0, 1.0) + _norm_lp(z[..., 1], z[..., 0] ** 2, 0.5)


def funnel(z):
    """Neal's funnel, 2-D: v ~ N(0, 3²), x | v ~ N(0, exp(v/2)²)."""
    return _norm_lp(z[..., 0], 0.0, 3.0) + _norm_lp(z[..., 1], 0.0, jnp.exp(z[..., 0] / 2))


def mixture(z):
    """½ N((−1.5, −1.5), 0.6² I) + ½ N((1.5, 1.5), 0.6² I)."""
    a = _norm_lp(z[..., 0], -1.5, 0.6) + _norm_lp(z[..., 1], -1.5, 0.6)
    b = _norm_lp(z[..., 0], 1.5, 0.6) + _norm_lp(z[..., 1], 1.5, 0.6)
    return jnp.logaddexp(a, b) + math.log(0.5)


_G_COV = np.array([[2.0, 1.2], [1.2, 1.0]])
_G_CHOL = np.linalg.cholesky(_G_COV)


def gaussian(z):
    """N((1, −1), [[2, 1.2], [1.2, 1]])."""
    d = z - jnp.array([1.0, -1.0], z.dtype)
    flat = jnp.reshape(d, (-1, 2))
    u = jax.scipy.linalg.solve_triangular(jnp.asarray(_G_CHOL, z.dtype), flat.T, lower=True).T
    lp = -0.5 * jnp.sum(u**2, -1) - float(np.log(np.diag(_G_CHOL)).sum()) - math.log(2 * math.pi)
    return jnp.reshape(lp, z.shape[:-1])


def grid_log_z(log_density, box, n):
    """log ∫ p̃ on a uniform n×n grid over ``box = ((lo0, hi0), (lo1, hi1))``."""
    (a0, b0), (a1, b1) = box
    x0, x1 = np.linspace(a0, b0, n), np.linspace(a1, b1, n)
    g = jnp.stack(jnp.meshgrid(jnp.asarray(x0), jnp.asarray(x1), indexing="ij"), -1)
    lp = jax.jit(log_density)(g)
    cell = (x0[1] - x0[0]) * (x1[1] - x1[0])
    return float(jax.scipy.special.logsumexp(lp)) + math.log(cell)


def funnel_log_z(n):
    """Funnel log Z by quadrature in (v, u) with x = exp(v/2)·u (resolves the narrow neck)."""
    v = np.linspace(-30.0, 30.0, n)
    u = np.linspace(-12.0, 12.0, n)
    vv, uu = np.meshgrid(v, u, indexing="ij")
    x = np.exp(vv / 2) * uu
    lp = jax.jit(funnel)(jnp.stack([jnp.asarray(vv), jnp.asarray(x)], -1)) + jnp.asarray(vv / 2)
    cell = (v[1] - v[0]) * (u[1] - u[0])
    return float(jax.scipy.special.logsumexp(lp)) + math.log(cell)


_TWO_D = {
    "banana": (banana, lambda n: grid_log_z(banana, ((-7, 7), (-4, 45)), n)),
    "funnel": (funnel, funnel_log_z),
    "mixture": (mixture, lambda n: grid_log_z(mixture, ((-7, 7), (-7, 7)), n)),
    "gaussian": (gaussian, lambda n: grid_log_z(gaussian, ((-9, 11), (-8, 6)), n)),
}


# --- eight_schools_centered (NumPyro) ---------------------------------------------------------


def eight_schools_centered(num_schools, sigma, y=None):
    import numpyro
    import numpyro.distributions as dist

    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", num_schools):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _eight_schools_target(vi):
    data = json.loads((_POSTERIORDB / f"{_EIGHT_STEM}.data.json").read_text())
    return vi.Target.from_numpyro(eight_schools_centered, int(data["J"]),
                                  jnp.asarray(data["sigma"], jnp.float32),
                                  jnp.asarray(data["y"], jnp.float32))


# --- the case ---------------------------------------------------------------------------------


def run(cfg, ctx) -> dict:
    import vi_engine as vi

    cfg = cfg["flows"]
    fit_kw = {"num_elbo_samples": cfg["num_elbo_samples"], "progress": False}
    if cfg.get("fixed_steps"):
        fit_kw.update(num_steps=cfg["fixed_steps"], tol=None)
    families = ("fullrank", "flow")
    # a fixed short run (--tiny) is not a converged fit: its checks are reported as info only
    judge = (lambda ok: None) if cfg.get("fixed_steps") else (lambda ok: bool(ok))
    rows, checks, data = [], [], {"targets": {}}

    for name in cfg["targets"]:
        if name == "eight_schools_centered":
            target, log_z = _eight_schools_target(vi), None
        else:
            f, log_z_fn = _TWO_D[name]
            target = vi.Target.from_log_density(f, 2)
            log_z = log_z_fn(cfg["grid_n"])
        entry = {"dim": int(target.dim), "log_z": log_z, "families": {}}
        for fam in families:
            log(f"flows: {name} (dim {target.dim}), {fam}")
            res, secs = timed_call(vi.fit, target, fam, key=jax.random.key(cfg["seed"]),
                                   **fit_kw)
            e, se = float(res.elbo.mean), float(res.elbo.stderr)
            kl = None if log_z is None else log_z - e
            entry["families"][fam] = {"elbo": e, "elbo_stderr": se, "kl": kl,
                                      "steps": int(res.num_steps), "status": str(res.status),
                                      "fit_seconds": secs}
            rows.append([name, fam, e, se, log_z, kl, int(res.num_steps), str(res.status),
                         secs])
        data["targets"][name] = entry

        fr, fl = entry["families"]["fullrank"], entry["families"]["flow"]
        if name == "gaussian":
            diff = abs(fl["kl"] - fr["kl"])
            bar = cfg["gaussian_kl_bar"]
            checks.append({"name": "flows gaussian: |KL(q‖p) flow − full-rank| (full-rank exact)",
                           "value": diff, "bar": f"< {bar}", "pass": judge(diff < bar)})
        else:
            gain = fl["elbo"] - fr["elbo"]
            se = math.hypot(fl["elbo_stderr"], fr["elbo_stderr"])
            checks.append({"name": f"flows {name}: ELBO flow − full-rank (± {se:.2g})"
                                   + ("; = KL reduction" if log_z is not None else ""),
                           "value": gain, "bar": "> 0", "pass": judge(gain > 0)})

    return {
        "name": NAME,
        "table": {
            "title": "normalizing flow vs full-rank Gaussian: vi.fit defaults, ELBO from "
                     f"{cfg['num_elbo_samples']} draws, KL(q‖p) = log Z − ELBO (log Z by "
                     "quadrature), fit time cold (compile included)",
            "columns": ["target", "family", "ELBO", "± se", "log Z", "KL(q‖p)", "steps",
                        "status", "fit s"],
            "rows": rows,
        },
        "checks": checks,
        "data": data,
    }
