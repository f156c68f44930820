"""The eight posteriordb posteriors of ``../shared/reference/posteriordb`` as NumPyro models.

Each model follows its ``*.model.md`` description (written from posteriordb's Stan code); the
reference summaries (``*.reference.json``) are pooled Stan NUTS draws. ``load(name)`` returns
the model's arguments and the reference; ``compare(draws, reference)`` the standardized
errors of a fit's constrained draws.

>>> import jax, vi_engine as vi
>>> from benchmarks import posteriordb as pdb
>>> model, args, ref = pdb.load("arK-arK")                                # doctest: +SKIP
>>> res = vi.fit(vi.Target.from_numpyro(model, *args), "fullrank", key=jax.random.key(0))
...                                                                        # doctest: +SKIP
>>> pdb.compare(res.sample(jax.random.key(1), 10_000), ref)["max_abs_z"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "posteriordb"


def eight_schools_noncentered(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([8]).to_event(1))
    theta = numpyro.deterministic("theta", mu + tau * theta_trans)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_centered(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([8]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def ark(lags, y_next):
    k = lags.shape[1]
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([k]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y_next)


def garch11(y, sigma1):
    # Flat priors on the constrained region; beta1's bound 1 - alpha1 depends on alpha1, so
    # beta1 = (1 - alpha1) u with u uniform, and the factor makes (alpha1, beta1) flat on the
    # triangle (the Jacobian of u -> beta1).
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
    alpha0 = numpyro.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    u = numpyro.sample("u", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * u)
    numpyro.factor("jacobian", jnp.log1p(-alpha1))

    def recursion(s, y_prev):
        s = jnp.sqrt(alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * s**2)
        return s, s

    sigma1 = jnp.asarray(sigma1, y.dtype)
    _, rest = jax.lax.scan(recursion, sigma1, y[:-1])
    numpyro.sample("y", dist.Normal(mu, jnp.concatenate([sigma1[None], rest])), obs=y)


def gp_pois_regr(x, k):
    n = x.shape[0]
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
    cov = alpha**2 * jnp.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2))
    cov = cov + 1e-10 * jnp.eye(n, dtype=x.dtype)
    f = numpyro.deterministic("f", jnp.linalg.cholesky(cov) @ f_tilde)
    numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def kidscore_interaction(mom_hs, mom_iq, kid_score):
    beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real, (), (4,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * mom_hs * mom_iq
    numpyro.sample("kid_score", dist.Normal(mean, sigma), obs=kid_score)


def kilpisjarvi(x, y, priors):
    pmualpha, psalpha, pmubeta, psbeta = priors
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def low_dim_gauss_mix(y):
    mu = numpyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    lp = jnp.logaddexp(jnp.log(theta) + dist.Normal(mu[0], sigma[0]).log_prob(y),
                       jnp.log1p(-theta) + dist.Normal(mu[1], sigma[1]).log_prob(y))
    numpyro.factor("y", lp.sum())


def _args(name, data):
    def a(key):
        return jnp.asarray(np.asarray(data[key], np.float64))

    if name.startswith("eight_schools"):
        return a("y"), a("sigma")
    if name == "arK-arK":
        k, y = data["K"], np.asarray(data["y"], np.float64)
        lags = np.stack([y[k - j - 1:len(y) - j - 1] for j in range(k)], axis=1)
        return jnp.asarray(lags), jnp.asarray(y[k:])
    if name == "garch-garch11":
        return a("y"), float(data["sigma1"])
    if name == "gp_pois_regr-gp_pois_regr":
        return a("x"), jnp.asarray(np.asarray(data["k"]))
    if name == "kidiq-kidscore_interaction":
        return a("mom_hs"), a("mom_iq"), a("kid_score")
    if name == "kilpisjarvi_mod-kilpisjarvi":
        priors = tuple(float(data[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta"))
        return a("x"), a("y"), priors
    if name == "low_dim_gauss_mix-low_dim_gauss_mix":
        return (a("y"),)
    raise KeyError(name)


MODELS = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "eight_schools-eight_schools_centered": eight_schools_centered,
    "arK-arK": ark,
    "garch-garch11": garch11,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "kidiq-kidscore_interaction": kidscore_interaction,
    "kilpisjarvi_mod-kilpisjarvi": kilpisjarvi,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
}


def available() -> bool:
    return REFERENCE.is_dir()


def load(name: str):
    """``(model, args, reference)`` for posterior ``name`` (a key of ``MODELS``).

    ``args`` are float64 NumPy-backed arrays where x64 is on (jax casts them to float32
    otherwise); ``reference["parameters"][p]`` has ``mean``, ``sd``, ``q05``, ``q50``, ``q95``
    for each reference name ``p`` such as ``"theta[1]"``.
    """
    data = json.loads((REFERENCE / f"{name}.data.json").read_text())
    ref = json.loads((REFERENCE / f"{name}.reference.json").read_text())
    return MODELS[name], _args(name, data), ref


def reference_values(draws: dict, names) -> dict:
    """Draws per reference name: ``"theta[3]"`` is ``draws["theta"][:, 2]``."""
    out = {}
    for p in names:
        if "[" in p:
            site, idx = p[:-1].split("[")
            out[p] = np.asarray(draws[site])[:, int(idx) - 1]
        else:
            out[p] = np.asarray(draws[p])
    return out


def compare(draws: dict, ref: dict) -> dict:
    """Per reference parameter, the error of the mean in reference sds (``z``) and the ratio of
    sds; plus ``max_abs_z`` and the range of the sd ratios."""
    names = ref["parameter_names"]
    values = reference_values(draws, names)
    rows = {}
    for p in names:
        r = ref["parameters"][p]
        v = values[p].astype(np.float64)
        rows[p] = {"z": (v.mean() - r["mean"]) / r["sd"], "sd_ratio": v.std(ddof=1) / r["sd"]}
    zs = [abs(r["z"]) for r in rows.values()]
    ratios = [r["sd_ratio"] for r in rows.values()]
    return {"params": rows, "max_abs_z": max(zs), "sd_ratio_min": min(ratios),
            "sd_ratio_max": max(ratios)}
