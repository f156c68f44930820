"""Problems with an exact posterior and an exact log evidence, to prove fits right.

Each constructor returns an :class:`ExactProblem` ``(target, posterior, log_evidence, name,
true_params)``:

- ``target``: a :class:`~vi_engine.targets.Target`, log p̃(z) = log p(D, z) on the unconstrained
  space R^dim (constrained parameters mapped by numpyro's ``biject_to``, log-Jacobian included);
- ``posterior``: the exact p*(z) = p̃(z) / p(D) as a numpyro ``Distribution`` over the same
  unconstrained space, ``event_shape == (dim,)``;
- ``log_evidence``: log p(D), a scalar array.

So ``target(z) - log_evidence == posterior.log_prob(z)`` for every z, and for any q,
ELBO(q) = log p(D) - KL(q‖p*) (the seed's eq. 5).

Each problem is built from the user's data (``normal_mean``, ``linear_regression``,
``gaussian``, ``beta_binomial``, ``gamma_poisson``, ``dirichlet_categorical``) or from a seeded
generator for benchmarks (``make_<name>(key, ...)``, or :func:`make_all`).

References: Bishop (2006) PRML §2.3.6 (normal mean), §3.3, §3.5 (linear regression and its
evidence); Murphy (2012) MLaPP §3.3–3.5 (beta–binomial, Dirichlet–multinomial), Gelman et al.
BDA3 §2.6 (gamma–Poisson).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln, xlogy
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from vi_engine import _compile
from vi_engine.targets import Target, _any_tracer, _under_transformation

__all__ = [
    "ExactProblem",
    "normal_mean",
    "linear_regression",
    "gaussian",
    "beta_binomial",
    "gamma_poisson",
    "dirichlet_categorical",
    "make_normal_mean",
    "make_linear_regression",
    "make_gaussian",
    "make_beta_binomial",
    "make_gamma_poisson",
    "make_dirichlet_categorical",
    "make_all",
]

_LOG_2PI = float(np.log(2 * np.pi))


class ExactProblem(NamedTuple):
    """A target with its exact posterior (over the target's unconstrained space) and evidence.

    Fields:
        target: the :class:`Target`, ``dim`` = dimension of z.
        posterior: numpyro Distribution, ``event_shape == (target.dim,)``.
        log_evidence: ``()`` log p(D).
        name: a label.
        true_params: for generated problems, the parameters the data was drawn from
            (constrained, keyed like the target's sites); ``None`` for user data.
    """

    target: Target
    posterior: Any
    log_evidence: jax.Array
    name: str
    true_params: dict | None = None


def _dtype(*xs, dtype=None):
    if dtype is not None:
        return jnp.dtype(dtype)
    floats = [x for x in xs if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.result_type(float, *floats)


def _check_finite(name, x):
    if isinstance(x, jax.core.Tracer):
        return
    x = np.asarray(x)
    bad = int(np.sum(~np.isfinite(x)))
    if bad:
        raise ValueError(
            f"{name} has {bad} NaN/inf entries out of {x.size} (shape {x.shape}); "
            "drop or impute them first."
        )


def _scalar(fn, **named):
    """A ValueError naming the argument unless each is a scalar: the closed forms take one
    scale or concentration (an array of them broadcast into a wrong, vector log evidence,
    found in review)."""
    for name, x in named.items():
        if np.ndim(x) != 0:
            raise ValueError(f"{fn}: {name} must be a scalar; got shape {np.shape(x)}.")


def _positive(fn, scalar=True, **named):
    """A ValueError naming the argument unless each is positive and finite (when concrete):
    a zero, negative or NaN scale or concentration surfaced as numpyro's error about another
    parameter, or as a non-finite density at z = 0 (found in review). ``scalar``: and a
    scalar (``_scalar``)."""
    if scalar:
        _scalar(fn, **named)
    for name, x in named.items():
        if isinstance(x, jax.core.Tracer):
            continue
        a = np.asarray(x, np.float64)
        if not np.all(np.isfinite(a) & (a > 0)):
            raise ValueError(f"{fn}: {name} must be positive and finite; got {_show(a)}.")


def _counts(fn, **named):
    """A ValueError naming the argument unless each holds non-negative whole numbers."""
    for name, x in named.items():
        if isinstance(x, jax.core.Tracer):
            continue
        a = np.asarray(x, np.float64)
        if not np.all((a >= 0) & (a == np.round(a))):
            raise ValueError(f"{fn}: {name} must hold counts (whole numbers >= 0); got "
                             f"{_show(a)}.")


def _show(a):
    return repr(a.item()) if a.size == 1 else np.array2string(a.ravel(), threshold=8)


def _in_float64(solve, dtype, *args):
    """``solve(*args)``'s outputs in ``dtype``, computed in float64 where the arguments are
    concrete (each converted from its own values, not from a float32 copy), else in ``dtype``
    under the caller's JAX transformation.

    The conjugate evidences sum log-gammas of the data that cancel down to a number of order
    log N: in float32, a Beta–Binomial with 10^7 trials gave −53.5 against −15.55 (found in
    review), and counts above 2^24 were rounded before they entered. Reference values must
    not carry that; a traced call (jit, vmap, grad) keeps the input dtype."""
    if jnp.dtype(dtype) == jnp.float64 or _under_transformation(args):
        return solve(*(jnp.asarray(a, dtype) for a in args))
    with jax.enable_x64(True):
        out = jax.device_get(solve(*(jnp.asarray(np.asarray(a, np.float64)) for a in args)))
    if isinstance(out, tuple):
        return tuple(jnp.asarray(o, dtype) for o in out)
    return jnp.asarray(out, dtype)


def _as(x, dtype, name, ndim=None):
    x = jnp.asarray(x, dtype)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {x.shape}.")
    _check_finite(name, x)
    return x


# --------------------------------------------------------------------------------------------
# Normal mean, known variance
# --------------------------------------------------------------------------------------------
def _normal_mean_log_joint(z, y, prior_loc, prior_scale, noise_scale):
    mu = z[0]
    return dist.Normal(prior_loc, prior_scale).log_prob(mu) + jnp.sum(
        dist.Normal(mu, noise_scale).log_prob(y)
    )


def normal_mean(y, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0) -> ExactProblem:
    """Unknown mean μ of Normal data with known noise: μ ~ N(m0, s0²), y_i | μ ~ N(μ, σ²).

    Args:
        y: ``(n,)`` observations.
        prior_loc, prior_scale: m0, s0. noise_scale: σ.

    Returns:
        ExactProblem with ``dim == 1`` (z = [μ]); posterior ``N(m_n, s_n²)`` with
        ``1/s_n² = 1/s0² + n/σ²``, ``m_n = s_n² (m0/s0² + Σy/σ²)``.

    >>> import jax.numpy as jnp
    >>> p = normal_mean(jnp.array([0.9, 1.1]), prior_loc=0.0, prior_scale=1.0, noise_scale=0.5)
    >>> p.target.dim, p.posterior.event_shape
    (1, (1,))
    """
    _scalar("normal_mean", prior_loc=prior_loc, prior_scale=prior_scale, noise_scale=noise_scale)
    dtype = _dtype(y, prior_loc, prior_scale, noise_scale)
    y = _as(y, dtype, "y", ndim=1)
    _check_finite("normal_mean: prior_loc", prior_loc)
    _positive("normal_mean", prior_scale=prior_scale, noise_scale=noise_scale)
    m0, s0, sigma = (jnp.asarray(v, dtype) for v in (prior_loc, prior_scale, noise_scale))
    post_loc, post_scale, log_ev = _normal_mean_solve(y, m0, s0, sigma)
    post = dist.Normal(post_loc, post_scale).to_event(1)
    target = Target.from_log_density(
        _normal_mean_log_joint, 1, data=(y, m0, s0, sigma), name="normal_mean"
    )
    return ExactProblem(target, post, log_ev, "normal_mean")


@_compile.jit_once
def _normal_mean_solve(y, m0, s0, sigma):
    n = y.shape[0]
    post_var = 1.0 / (1.0 / s0**2 + n / sigma**2)
    post_loc = post_var * (m0 / s0**2 + jnp.sum(y) / sigma**2)
    post_scale = jnp.sqrt(post_var)
    # Candidate's formula p(D) = p(D|μ) p(μ) / p(μ|D), exact at any μ; take μ = m_n.
    zstar = post_loc[None]
    log_ev = _normal_mean_log_joint(zstar, y, m0, s0, sigma) - dist.Normal(
        post_loc, post_scale
    ).log_prob(post_loc)
    return post_loc[None], post_scale[None], log_ev


def make_normal_mean(
    key, n=20, prior_loc=0.0, prior_scale=1.0, noise_scale=1.0, dtype=None
) -> ExactProblem:
    """A :func:`normal_mean` problem with μ drawn from the prior and ``n`` data points.

    >>> import jax
    >>> make_normal_mean(jax.random.key(0), n=10).true_params["mu"].shape
    ()
    """
    mu, y = _draw_normal_mean(key, n, prior_loc, prior_scale, noise_scale, _dtype(dtype=dtype))
    return normal_mean(y, prior_loc, prior_scale, noise_scale)._replace(true_params={"mu": mu})


@partial(_compile.jit_once, static_argnums=(1, 5))
def _draw_normal_mean(key, n, prior_loc, prior_scale, noise_scale, dtype):
    k1, k2 = jax.random.split(key)
    mu = prior_loc + prior_scale * jax.random.normal(k1, (), dtype)
    return mu, mu + noise_scale * jax.random.normal(k2, (n,), dtype)


# --------------------------------------------------------------------------------------------
# Bayesian linear regression, Gaussian prior, known noise
# --------------------------------------------------------------------------------------------
def _linreg_log_joint(w, X, y, prior_scale, noise_scale):
    return jnp.sum(dist.Normal(0.0, prior_scale).log_prob(w)) + jnp.sum(
        dist.Normal(X @ w, noise_scale).log_prob(y)
    )


def linear_regression(X, y, prior_scale=1.0, noise_scale=1.0) -> ExactProblem:
    """Bayesian linear regression: w ~ N(0, s0² I_d), y | w ~ N(X w, σ² I_N).

    Posterior N(m, A⁻¹) with precision ``A = I/s0² + XᵀX/σ²`` and ``m = A⁻¹ Xᵀy / σ²``, from a
    QR factorization of the stacked system ``[X/σ; I/s0]`` (never forming ``XᵀX``, whose
    condition number is X's squared). Evidence log N(y; 0, σ² I + s0² X Xᵀ), computed in the
    d×d form (matrix determinant lemma + Woodbury): ``log det C = 2N log σ + 2d log s0 + log det A``
    and ``yᵀC⁻¹y = ‖y − X m‖²/σ² + ‖m‖²/s0²`` (a sum of non-negative terms, no cancellation).

    Args:
        X: ``(N, d)`` design. y: ``(N,)`` responses. prior_scale: s0. noise_scale: σ.

    >>> import jax
    >>> p = make_linear_regression(jax.random.key(0), n=30, d=3)
    >>> p.target.dim, p.posterior.event_shape
    (3, (3,))
    """
    _scalar("linear_regression", prior_scale=prior_scale, noise_scale=noise_scale)
    dtype = _dtype(X, y, prior_scale, noise_scale)
    X = _as(X, dtype, "X", ndim=2)
    y = _as(y, dtype, "y", ndim=1)
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_regression: X has {X.shape[0]} rows but y has {y.shape[0]} entries."
        )
    _positive("linear_regression", prior_scale=prior_scale, noise_scale=noise_scale)
    s0 = jnp.asarray(prior_scale, dtype)
    sigma = jnp.asarray(noise_scale, dtype)
    m, scale_tril, log_ev = _linreg_solve(X, y, s0, sigma)
    # Not validated: a Cholesky factor by construction, and numpyro's eager check of it (on by
    # default in numpyro 0.22) compiled op by op: 1.1 of make_linear_regression's 1.8 s.
    post = dist.MultivariateNormal(loc=m, scale_tril=scale_tril, validate_args=False)
    target = Target.from_log_density(
        _linreg_log_joint, X.shape[1], data=(X, y, s0, sigma), name="linear_regression"
    )
    return ExactProblem(target, post, log_ev, "linear_regression")


@_compile.jit_once
def _linreg_solve(X, y, s0, sigma):
    n, d = X.shape
    # Least squares on the stacked system [X/σ; I/s0] w ≈ [y/σ; 0], by QR: the normal equations'
    # precision A = I/s0² + XᵀX/σ² squares X's condition number, and in float32 a design of
    # condition 1.7e3 gave log evidence 166.25 against 183.21 and means 30% off (found in
    # review). Columns reversed (J): ZJ = QR gives A = J RᵀR J, so the covariance A⁻¹ is
    # (J R⁻¹ J)(J R⁻¹ J)ᵀ with J R⁻¹ J lower triangular: its Cholesky factor, up to signs.
    eye = jnp.eye(d, dtype=X.dtype)
    z = jnp.concatenate([X / sigma, eye / s0])[:, ::-1]
    b = jnp.concatenate([y / sigma, jnp.zeros((d,), X.dtype)])
    q, r = jnp.linalg.qr(z)
    # The triangular solve after Q's LAPACK call (``_compile.after``): batched (vmapped) calls
    # side by side can deadlock jaxlib 0.10 on CPU.
    r_inv = solve_triangular(_compile.after(r, q), eye, lower=False)
    m = (r_inv @ (q.T @ b))[::-1]
    lo = r_inv[::-1, ::-1]
    scale_tril = lo * jnp.sign(jnp.diagonal(lo))[None, :]
    quad = jnp.sum(jnp.square((y - X @ m) / sigma)) + jnp.sum(jnp.square(m / s0))
    logdet = (2 * n * jnp.log(sigma) + 2 * d * jnp.log(s0)
              + 2 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(r)))))
    return m, scale_tril, -0.5 * (n * _LOG_2PI + logdet + quad)


@partial(_compile.jit_once, static_argnums=(1, 2, 5))
def _draw_linear_regression(key, n, d, noise_scale, prior_scale, dtype):
    kx, kw, ke = jax.random.split(key, 3)
    X = jax.random.normal(kx, (n, d), dtype)
    w = prior_scale * jax.random.normal(kw, (d,), dtype)
    return X, w, X @ w + noise_scale * jax.random.normal(ke, (n,), dtype)


def make_linear_regression(
    key, n=50, d=3, noise_scale=1.0, prior_scale=1.0, dtype=None
) -> ExactProblem:
    """A :func:`linear_regression` problem: X ~ N(0, 1), w from the prior, y = Xw + noise.

    >>> import jax
    >>> make_linear_regression(jax.random.key(1), n=20, d=2).true_params["w"].shape
    (2,)
    """
    X, w, y = _draw_linear_regression(key, n, d, noise_scale, prior_scale, _dtype(dtype=dtype))
    return linear_regression(X, y, prior_scale, noise_scale)._replace(true_params={"w": w})


# --------------------------------------------------------------------------------------------
# Correlated multivariate Gaussian target
# --------------------------------------------------------------------------------------------
def _gaussian_log_density(z, mean, scale_tril, offset):
    u = solve_triangular(scale_tril, z - mean, lower=True)
    return offset - 0.5 * jnp.sum(u**2)


def gaussian(mean, cov, offset=0.0) -> ExactProblem:
    """An unnormalized Gaussian target ``log p̃(z) = offset − ½ (z−μ)ᵀ Σ⁻¹ (z−μ)``.

    Its normalizer is known: ``log_evidence = offset + ½ log det(2π Σ)``; the posterior is
    N(μ, Σ). Useful for mean-field vs full-rank comparisons (reverse KL shrinks variances to
    1/Λ_ii, Λ = Σ⁻¹).

    Args:
        mean: ``(d,)``. cov: ``(d, d)`` symmetric positive definite. offset: any constant.

    >>> import jax.numpy as jnp
    >>> p = gaussian(jnp.zeros(2), jnp.array([[1.0, 0.9], [0.9, 1.0]]), offset=3.0)
    >>> p.target.dim
    2
    """
    dtype = _dtype(mean, cov, offset)
    mean = _as(mean, dtype, "mean", ndim=1)
    cov = _as(cov, dtype, "cov", ndim=2)
    d = mean.shape[0]
    if cov.shape != (d, d):
        raise ValueError(f"gaussian: cov must have shape ({d}, {d}); got {cov.shape}.")
    offset = jnp.asarray(offset, dtype)
    if jnp.ndim(offset) != 0:
        raise ValueError(f"gaussian: offset must be a scalar; got shape {jnp.shape(offset)}.")
    if not isinstance(offset, jax.core.Tracer) and not np.isfinite(np.asarray(offset)):
        raise ValueError(f"gaussian: offset must be finite; got {float(offset)}.")
    if not isinstance(cov, jax.core.Tracer):
        # jnp.linalg.cholesky uses (cov + cov.T) / 2: a grossly asymmetric cov (a Cholesky
        # factor, a typo) would be taken as some other matrix without a word. Rounding in a
        # computed covariance (an inverse of an ill-conditioned precision: 2e-4 relative in
        # float32 at condition 1e5, measured) stays under the tolerance, sqrt(eps) relative.
        c = np.asarray(cov)
        asym = float(np.max(np.abs(c - c.T), initial=0.0))
        scale = float(np.max(np.abs(c), initial=0.0))
        if not asym <= np.sqrt(np.finfo(c.dtype).eps) * scale:
            raise ValueError(
                f"gaussian: cov must be symmetric; max |cov - cov.T| = {asym:.3g} (largest "
                f"entry {scale:.3g}). Symmetrize it, e.g. (cov + cov.T) / 2, if that is meant."
            )
    L, log_ev = _gaussian_solve(cov, offset)
    if not isinstance(L, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(L))):
        raise ValueError("gaussian: cov is not symmetric positive definite (Cholesky failed).")
    post = dist.MultivariateNormal(loc=mean, scale_tril=L, validate_args=False)  # L checked
    target = Target.from_log_density(
        _gaussian_log_density, d, data=(mean, L, offset), name="gaussian"
    )
    return ExactProblem(target, post, log_ev, "gaussian")


@_compile.jit_once
def _gaussian_solve(cov, offset):
    L = jnp.linalg.cholesky(cov)
    return L, offset + 0.5 * cov.shape[0] * _LOG_2PI + jnp.sum(jnp.log(jnp.diag(L)))


@partial(_compile.jit_once, static_argnums=(1, 3))
def _draw_gaussian(key, d, correlation, dtype):
    km, ks, kr, ko = jax.random.split(key, 4)
    mean = jax.random.normal(km, (d,), dtype)
    scales = jnp.exp(0.5 * jax.random.normal(ks, (d,), dtype))
    R = (1 - correlation) * jnp.eye(d, dtype=dtype) + correlation * jnp.ones((d, d), dtype)
    B = 0.1 * jax.random.normal(kr, (d, d), dtype)
    R = R + B @ B.T
    cov = scales[:, None] * R * scales[None, :]
    return mean, cov, 5.0 * jax.random.normal(ko, (), dtype)


def make_gaussian(key, d=5, correlation=0.8, dtype=None) -> ExactProblem:
    """A :func:`gaussian` problem with a random mean, random scales, an equicorrelation-like
    covariance (off-diagonal correlation ``correlation``, perturbed) and a random offset.

    >>> import jax
    >>> make_gaussian(jax.random.key(0), d=4).posterior.event_shape
    (4,)
    """
    mean, cov, offset = _draw_gaussian(key, d, correlation, _dtype(dtype=dtype))
    return gaussian(mean, cov, offset)._replace(true_params={"mean": mean, "cov": cov})


# --------------------------------------------------------------------------------------------
# Conjugate models with constrained parameters: targets through numpyro (biject_to + log|J|)
# --------------------------------------------------------------------------------------------
def _unconstrained_posterior(base, support):
    """``base`` pushed to R^dim by ``biject_to(support).inv``, with event shape ``(dim,)``."""
    if base.event_shape == ():
        base = base.expand((1,)).to_event(1)
    return dist.TransformedDistribution(base, biject_to(support).inv)


def _beta_binomial_model(successes, trials, a, b):
    p = numpyro.sample("p", dist.Beta(a, b))
    numpyro.sample("successes", dist.Binomial(trials, probs=p), obs=successes)


def beta_binomial(successes, trials, a=1.0, b=1.0) -> ExactProblem:
    """Beta–Binomial: p ~ Beta(a, b), successes_i ~ Binomial(trials_i, p).

    The target lives on z = logit(p) (``dim == 1``); posterior Beta(a + K, b + N − K) pushed
    to the logit scale, K = Σ successes, N = Σ trials. Evidence
    ``Σ log C(n_i, k_i) + log B(a + K, b + N − K) − log B(a, b)``.

    Args:
        successes, trials: ``(n,)`` counts (0 ≤ successes ≤ trials). a, b: prior.

    >>> import jax.numpy as jnp
    >>> p = beta_binomial(jnp.array([3, 5]), jnp.array([10, 10]), a=2.0, b=2.0)
    >>> p.target.site_names, p.posterior.event_shape
    (('p',), (1,))
    """
    _scalar("beta_binomial", a=a, b=b)
    dtype = _dtype(a, b)
    k = _as(successes, dtype, "successes", ndim=1)
    n = _as(trials, dtype, "trials", ndim=1)
    if k.shape != n.shape:
        raise ValueError(f"beta_binomial: successes {k.shape} and trials {n.shape} differ.")
    _positive("beta_binomial", a=a, b=b)
    # Checked on the caller's values, not on their float32 copies: there 2^24 + 1 successes
    # of 2^24 trials both read 2^24 (and 2^24 + 0.5 reads as a count), while the evidence is
    # computed in float64 from the caller's values (``_in_float64``).
    _counts("beta_binomial", successes=successes, trials=trials)
    if not _any_tracer((successes, trials)):
        k64, n64 = np.asarray(successes), np.asarray(trials)
        if not (k64.dtype.kind in "iu" and n64.dtype.kind in "iu"):  # integers compare exactly
            k64, n64 = k64.astype(np.float64), n64.astype(np.float64)
        if np.any(k64 > n64):
            i = int(np.argmax(k64 > n64))
            raise ValueError(f"beta_binomial: successes must not exceed trials; got "
                             f"successes[{i}] = {_show(k64[i])} > trials[{i}] = "
                             f"{_show(n64[i])}.")
    a_post, b_post, log_ev = _in_float64(_beta_binomial_solve, dtype, successes, trials, a, b)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    post = _unconstrained_posterior(dist.Beta(a_post, b_post), constraints.unit_interval)
    target = Target.from_numpyro(_beta_binomial_model, k, n, a, b)
    return ExactProblem(target, post, log_ev, "beta_binomial")


def _betaln(a, b):
    # Not jax.scipy.special.betaln: in jax 0.10 it is off by ~5e-7 in float64 at (5, 10.5).
    return gammaln(a) + gammaln(b) - gammaln(a + b)


@_compile.jit_once
def _beta_binomial_solve(k, n, a, b):
    K, N = jnp.sum(k), jnp.sum(n)
    log_binom = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    log_ev = jnp.sum(log_binom) + _betaln(a + K, b + N - K) - _betaln(a, b)
    return a + K, b + N - K, log_ev


@partial(_compile.jit_once, static_argnums=(1, 2, 5))
def _draw_beta_binomial(key, n, trials, a, b, dtype):
    kp, kd = jax.random.split(key)
    p = jax.random.beta(kp, a, b, dtype=dtype)
    return p, jax.random.binomial(kd, trials, p, shape=(n,), dtype=dtype)


def make_beta_binomial(key, n=10, trials=20, a=2.0, b=3.0, dtype=None) -> ExactProblem:
    """A :func:`beta_binomial` problem: p from the prior, ``n`` groups of ``trials`` trials.

    >>> import jax
    >>> make_beta_binomial(jax.random.key(0)).target.dim
    1
    """
    dtype = _dtype(dtype=dtype)
    p, k = _draw_beta_binomial(key, n, trials, a, b, dtype)
    t = np.full((n,), trials, dtype)
    return beta_binomial(k, t, a, b)._replace(true_params={"p": p})


def _gamma_poisson_model(counts, a, b):
    rate = numpyro.sample("rate", dist.Gamma(a, b))
    numpyro.sample("counts", dist.Poisson(rate), obs=counts)


def gamma_poisson(counts, a=1.0, b=1.0) -> ExactProblem:
    """Gamma–Poisson: λ ~ Gamma(a, rate=b), counts_i ~ Poisson(λ).

    The target lives on z = log λ (``dim == 1``); posterior Gamma(a + S, b + n), S = Σ counts.
    Evidence ``a log b − log Γ(a) + log Γ(a + S) − (a + S) log(b + n) − Σ log(counts_i!)``.

    Args:
        counts: ``(n,)`` non-negative counts. a: prior shape. b: prior rate.

    >>> import jax.numpy as jnp
    >>> gamma_poisson(jnp.array([2, 4, 3]), a=2.0, b=1.0).target.site_names
    ('rate',)
    """
    _scalar("gamma_poisson", a=a, b=b)
    dtype = _dtype(a, b)
    c = _as(counts, dtype, "counts", ndim=1)
    _positive("gamma_poisson", a=a, b=b)
    _counts("gamma_poisson", counts=counts)  # the caller's values (see beta_binomial)
    a_post, b_post, log_ev = _in_float64(_gamma_poisson_solve, dtype, counts, a, b)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    post = _unconstrained_posterior(dist.Gamma(a_post, b_post), constraints.positive)
    target = Target.from_numpyro(_gamma_poisson_model, c, a, b)
    return ExactProblem(target, post, log_ev, "gamma_poisson")


@_compile.jit_once
def _gamma_poisson_solve(c, a, b):
    S, n = jnp.sum(c), c.shape[0]
    log_ev = (
        a * jnp.log(b)
        - gammaln(a)
        + gammaln(a + S)
        - (a + S) * jnp.log(b + n)
        - jnp.sum(gammaln(c + 1))
    )
    return a + S, b + n, log_ev


@partial(_compile.jit_once, static_argnums=(1, 4))
def _draw_gamma_poisson(key, n, a, b, dtype):
    kl, kc = jax.random.split(key)
    lam = jax.random.gamma(kl, a, dtype=dtype) / b
    return lam, jax.random.poisson(kc, lam, (n,)).astype(dtype)


def make_gamma_poisson(key, n=20, a=2.0, b=1.0, dtype=None) -> ExactProblem:
    """A :func:`gamma_poisson` problem: λ from the prior, ``n`` Poisson counts.

    >>> import jax
    >>> make_gamma_poisson(jax.random.key(0)).true_params["rate"].shape
    ()
    """
    lam, c = _draw_gamma_poisson(key, n, a, b, _dtype(dtype=dtype))
    return gamma_poisson(c, a, b)._replace(true_params={"rate": lam})


def _dirichlet_categorical_model(counts, alpha):
    probs = numpyro.sample("probs", dist.Dirichlet(alpha))
    # A sequence of categorical draws with these per-category counts: Π_k p_k^{c_k}.
    numpyro.factor("counts", jnp.sum(xlogy(counts, probs)))


def dirichlet_categorical(counts, alpha) -> ExactProblem:
    """Dirichlet–Categorical: p ~ Dirichlet(α), N categorical draws with category counts c.

    The likelihood is that of the sequence, Π_k p_k^{c_k} (no multinomial coefficient). The
    target lives on R^{K-1} (numpyro's stick-breaking ``biject_to(simplex)``); posterior
    Dirichlet(α + c) pushed there. Evidence
    ``log Γ(Σα) − log Γ(Σα + N) + Σ_k [log Γ(α_k + c_k) − log Γ(α_k)]``.

    Args:
        counts: ``(K,)`` non-negative counts per category. alpha: ``(K,)`` (or scalar) prior.

    >>> import jax.numpy as jnp
    >>> p = dirichlet_categorical(jnp.array([3.0, 0.0, 7.0]), jnp.ones(3))
    >>> p.target.dim, p.posterior.event_shape
    (2, (2,))
    """
    dtype = _dtype(counts, alpha)
    c = _as(counts, dtype, "counts", ndim=1)
    alpha_in = alpha
    alpha = _as(alpha, dtype, "alpha")
    if alpha.shape not in ((), (1,), c.shape):
        raise ValueError(
            f"dirichlet_categorical: alpha must be a scalar or have the shape of counts "
            f"{c.shape} (one per category); got {alpha.shape}."
        )
    if c.shape[0] < 2:
        raise ValueError(f"dirichlet_categorical: counts must have K >= 2 categories (a "
                         f"simplex of one category is a point); got shape {c.shape}.")
    alpha = jnp.broadcast_to(alpha, c.shape)
    _positive("dirichlet_categorical", scalar=False, alpha=alpha)
    if not isinstance(c, jax.core.Tracer) and bool(jnp.any(c < 0)):
        raise ValueError(f"dirichlet_categorical: counts must be >= 0; got {c}.")
    concentration = (alpha if _under_transformation(alpha_in)
                     else np.broadcast_to(np.asarray(alpha_in, np.float64), c.shape))
    log_ev = _in_float64(_dirichlet_categorical_solve, dtype, counts, concentration)
    post = _unconstrained_posterior(dist.Dirichlet(alpha + c), constraints.simplex)
    target = Target.from_numpyro(_dirichlet_categorical_model, c, alpha)
    return ExactProblem(target, post, log_ev, "dirichlet_categorical")


@_compile.jit_once
def _dirichlet_categorical_solve(c, alpha):
    return (
        gammaln(jnp.sum(alpha))
        - gammaln(jnp.sum(alpha) + jnp.sum(c))
        + jnp.sum(gammaln(alpha + c) - gammaln(alpha))
    )


@partial(_compile.jit_once, static_argnums=(1, 2, 4))
def _draw_dirichlet_categorical(key, n, k, alpha, dtype):
    kp, kd = jax.random.split(key)
    alpha = jnp.full((k,), alpha, dtype)
    p = jax.random.dirichlet(kp, alpha, dtype=dtype)
    draws = jax.random.categorical(kd, jnp.log(p), shape=(n,))
    return alpha, p, jnp.zeros((k,), dtype).at[draws].add(1.0)


def make_dirichlet_categorical(key, n=50, k=4, alpha=1.0, dtype=None) -> ExactProblem:
    """A :func:`dirichlet_categorical` problem: p from Dirichlet(α·1_k), ``n`` draws.

    >>> import jax
    >>> make_dirichlet_categorical(jax.random.key(0), k=3).target.dim
    2
    """
    alpha, p, counts = _draw_dirichlet_categorical(key, n, k, alpha, _dtype(dtype=dtype))
    return dirichlet_categorical(counts, alpha)._replace(true_params={"probs": p})


def make_all(key, dtype=None) -> dict:
    """One generated problem of each kind, keyed by name (small default sizes).

    >>> import jax
    >>> sorted(make_all(jax.random.key(0)))[:2]
    ['beta_binomial', 'dirichlet_categorical']
    """
    makers = (
        make_normal_mean,
        make_linear_regression,
        make_gaussian,
        make_beta_binomial,
        make_gamma_poisson,
        make_dirichlet_categorical,
    )
    keys = jax.random.split(key, len(makers))
    problems = [make(k, dtype=dtype) for make, k in zip(makers, keys, strict=True)]
    return {p.name: p for p in problems}
