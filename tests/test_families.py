"""Gaussian families against numpyro's own distributions and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import vi_engine as vi

FAMILIES = [vi.MeanField(), vi.FullRank(), vi.LowRank(rank=2)]


def _random_params(family, key, dim):
    """Parameters away from the initial values, so that every piece is exercised."""
    params = family.init(key, dim)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_sample_and_log_prob_agree_with_numpyro(family):
    params = _random_params(family, jax.random.key(0), 4)
    z, log_q = family.sample_and_log_prob(jax.random.key(1), params, 7)
    q = family.to_distribution(params)
    assert z.shape == (7, 4) and q.event_shape == (4,)
    np.testing.assert_allclose(log_q, q.log_prob(z), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(family.log_prob(params, z), q.log_prob(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_noise_contract(family):
    # vi.fit draws a window's noise up front for families that separate it: the draws must be
    # exactly those of sampling with the same key.
    params = _random_params(family, jax.random.key(0), 4)
    key = jax.random.key(5)
    if not family.has_noise:
        with pytest.raises(NotImplementedError, match="noise"):
            family.noise(key, params, 3)
        return
    eps = family.noise(key, params, 3)
    assert eps.shape == (3, 4)
    z, log_q = family.from_noise(params, eps)
    z2, log_q2 = family.sample_and_log_prob(key, params, 3)
    np.testing.assert_array_equal(z, z2)
    np.testing.assert_array_equal(log_q, log_q2)
    np.testing.assert_array_equal(family.sample(key, params, 3), z)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_entropy_matches_numpyro_and_draws_have_the_right_moments(family):
    params = _random_params(family, jax.random.key(2), 3)
    q = family.to_distribution(params)
    np.testing.assert_allclose(family.entropy(params), q.entropy(), rtol=1e-5)
    z = family.sample(jax.random.key(3), params, 200_000)
    np.testing.assert_allclose(z.mean(0), q.mean, atol=0.02)
    cov = jnp.diag(q.variance) if family.name == "meanfield" else q.covariance_matrix
    np.testing.assert_allclose(jnp.cov(z.T), cov, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_batched_params_give_batched_distributions(family):
    keys = jax.random.split(jax.random.key(4), 5)
    params = jax.vmap(lambda k: family.init(k, 3))(keys)
    q = family.to_distribution(params)
    assert q.batch_shape == (5,) and q.event_shape == (3,)


def test_fullrank_scale_tril_is_the_cholesky_of_the_covariance():
    family = vi.FullRank()
    params = _random_params(family, jax.random.key(5), 4)
    L = family.scale_tril(params)
    assert np.allclose(L, jnp.tril(L))
    cov = family.to_distribution(params).covariance_matrix
    np.testing.assert_allclose(jnp.linalg.cholesky(cov), L, rtol=1e-4, atol=1e-5)


def test_float64_under_x64():
    with jax.enable_x64(True):
        for family in FAMILIES:
            params = family.init(jax.random.key(0), 3)
            z, log_q = family.sample_and_log_prob(jax.random.key(1), params, 2)
            assert z.dtype == jnp.float64 and log_q.dtype == jnp.float64


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="init_scale"):
        vi.MeanField(init_scale=-1.0)
    with pytest.raises(ValueError, match="rank"):
        vi.LowRank(rank=0)
    with pytest.raises(ValueError, match="dim"):
        vi.FullRank().init(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="known families are: .*fullrank.*meanfield"):
        vi.get_family("gaussian")


def test_lowrank_rank_is_capped_at_dim():
    params = vi.LowRank(rank=10).init(jax.random.key(0), 3)
    assert params.cov_factor.shape == (3, 3)
    assert isinstance(vi.LowRank().to_distribution(params), dist.LowRankMultivariateNormal)


@pytest.mark.parametrize("case", ["correlated", "small-diagonal"])
def test_lowrank_log_prob_keeps_float32_accuracy_where_the_diagonal_is_small(case):
    # Where D is small beside W (a strongly correlated posterior) Woodbury's |x|² − |L⁻¹Aᵀx|²
    # cancels: numpyro's float32 log density was off by 0.9 nats (d = 10, rank 1, correlation
    # 0.99999) and by 97 (d = 20, rank 10, D = 1e-3); found in review. Against scipy, float64.
    from scipy import stats

    rng = np.random.default_rng(0)
    if case == "correlated":
        d, rho = 10, 0.99999
        w, log_diag = np.full((d, 1), np.sqrt(rho)), np.full(d, 0.5 * np.log(1 - rho))
        tol = 1e-3
    else:
        d = 20
        w, log_diag = rng.standard_normal((d, 10)), np.full(d, np.log(1e-3))
        tol = 1e-2
    loc = rng.standard_normal(d)
    cov = w @ w.T + np.diag(np.exp(2 * log_diag))
    z = rng.multivariate_normal(loc, cov, size=(3, 100))  # q's own draws, batched
    want = stats.multivariate_normal(loc, cov).logpdf(z)
    params = vi.families.gaussian.LowRankParams(
        *(jnp.asarray(a, jnp.float32) for a in (loc, w, log_diag)))
    got = vi.LowRank(rank=w.shape[1]).log_prob(params, jnp.asarray(z, jnp.float32))
    assert got.shape == (3, 100)
    np.testing.assert_allclose(got, want, atol=tol)
    # A batch of q (two copies) broadcast against the draws: as accurate.
    both = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), params)
    twice = vi.LowRank().log_prob(both, jnp.asarray(z[:, :2], jnp.float32))
    np.testing.assert_allclose(twice, want[:, :2], atol=tol)


def test_options_take_numpy_scalars_and_refuse_bools_and_non_finite_values():
    # Stored as plain Python numbers (part of a compiled fit's static key). Found in review:
    # NumPy scalars were refused by the Gaussian families and accepted by IWAE and Flow; a Flow
    # took an infinite scale_bound or init_scale (every log density NaN), truncated a width of
    # 2.5 to 2 and took num_layers=True.
    fam = vi.LowRank(rank=np.int64(2), init_scale=np.float32(0.5))
    assert type(fam.rank) is int and fam.rank == 2 and type(fam.init_scale) is float
    assert vi.MeanField().init(jax.random.key(0), np.int64(3)).loc.shape == (3,)
    assert vi.FullRank(init_scale=np.int32(2)).init_scale == 2.0
    flow = vi.Flow(num_layers=np.int64(2), hidden=(np.int32(8),))
    assert type(flow.num_layers) is int and type(flow.hidden[0]) is int
    assert flow.init(jax.random.key(0), np.int64(2))["loc"].shape == (2,)
    # Whole-number widths from a float config or a JAX array, and 0-d integer arrays, too.
    assert vi.Flow(hidden=(32.0,)).hidden == vi.Flow(hidden=tuple(jnp.array([32]))).hidden == (32,)
    assert vi.LowRank(rank=jnp.int32(3)).rank == 3
    bad = [(lambda: vi.LowRank(rank=True), "rank"),
           (lambda: vi.MeanField(init_scale=np.inf), "init_scale"),
           (lambda: vi.MeanField().init(jax.random.key(0), 2.0), "dim"),
           (lambda: vi.Flow(scale_bound=float("inf")), r"Flow\(scale_bound"),
           (lambda: vi.Flow(init_scale=np.nan), r"Flow\(init_scale"),
           (lambda: vi.Flow(init_scale=True), r"Flow\(init_scale"),
           (lambda: vi.Flow(hidden=(2.5,)), r"Flow\(hidden=...\) width"),
           (lambda: vi.Flow(num_layers=True), r"Flow\(num_layers"),
           (lambda: vi.Flow(num_layers=-1), r"Flow\(num_layers")]
    for make, name in bad:
        with pytest.raises(ValueError, match=name):
            make()
