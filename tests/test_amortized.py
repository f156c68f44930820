"""Tests for vi_engine/amortized.py: the VAE's ELBO parts, closed-form KL, IWAE ordering on
held-out digits, training loop, data loading and input errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("sklearn")

import vi_engine.amortized as am  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return am.load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained(data):
    return am.train(jax.random.key(0), data.x_train, hidden=(64,), num_steps=600,
                    steps_per_chunk=300, progress=False)


def test_load_digits_split(data):
    assert data.x_train.shape == (1438, 64) and data.x_test.shape == (359, 64)
    assert data.y_train.shape == (1438,) and set(np.unique(data.y_test)) == set(range(10))
    assert set(np.unique(data.x_train)) == {0.0, 1.0}
    # the split is a partition: no test image appears at the same index of another seed's split
    again = am.load_digits_split(seed=0)
    np.testing.assert_array_equal(again.x_test, data.x_test)


def test_train_returns_losses_that_decrease(trained):
    assert trained.losses.shape == (600,)
    assert bool(jnp.all(jnp.isfinite(trained.losses)))
    assert float(jnp.mean(trained.losses[-100:])) < float(jnp.mean(trained.losses[:100])) - 5


def test_elbo_is_reconstruction_minus_kl(trained, data):
    parts = am.elbo(trained.model, trained.params, jax.random.key(1), data.x_test[:50], 4)
    assert parts.elbo.shape == parts.reconstruction.shape == parts.kl.shape == (50,)
    np.testing.assert_array_equal(parts.elbo, parts.reconstruction - parts.kl)
    assert bool(jnp.all(parts.kl >= 0))


def test_kl_term_is_closed_form_and_sums_over_dimensions(trained, data):
    x = data.x_test[:50]
    q = am.encode(trained.model, trained.params, x)
    per_dim = am.kl_per_dimension(trained.model, trained.params, x)
    assert per_dim.shape == (50, 2)
    expected = 0.5 * (q.scale**2 + q.loc**2 - 1.0) - jnp.log(q.scale)
    np.testing.assert_allclose(per_dim, expected, rtol=1e-5, atol=1e-5)
    parts = am.elbo(trained.model, trained.params, jax.random.key(1), x)
    np.testing.assert_allclose(parts.kl, per_dim.sum(-1), rtol=1e-6)


def test_elbo_le_iwae_k_le_iwae_k_prime_on_held_out(trained, data):
    model, params, x = trained.model, trained.params, jnp.asarray(data.x_test)
    # many draws for the reconstruction term, so the ELBO itself is nearly noise-free
    elbo = am.elbo(model, params, jax.random.key(1), x, 256).elbo
    iwae = jax.jit(am.iwae_bound, static_argnums=(0, 4, 5))
    iw10 = iwae(model, params, jax.random.key(2), x, 10, 10)
    iw200 = iwae(model, params, jax.random.key(3), x, 200, 64)  # 3 chunks + a remainder
    for lo, hi in ((elbo, iw10), (iw10, iw200)):
        diff = hi - lo
        se = float(jnp.std(diff)) / math.sqrt(diff.shape[0])
        assert float(jnp.mean(diff)) > 3 * se, (float(jnp.mean(diff)), se)


def test_iwae_with_one_sample_is_an_unbiased_elbo(trained, data):
    model, params, x = trained.model, trained.params, jnp.asarray(data.x_test)
    # IWAE_1 = log p(x, z) − log q(z | x): the same expectation as the closed-form-KL ELBO
    iw1 = jax.vmap(lambda k: am.iwae_bound(model, params, k, x, 1))(
        jax.random.split(jax.random.key(4), 64)
    ).mean(0)
    elbo = am.elbo(model, params, jax.random.key(5), x, 64).elbo
    diff = iw1 - elbo
    se = float(jnp.std(diff)) / math.sqrt(diff.shape[0])
    assert abs(float(jnp.mean(diff))) < 4 * se + 1e-3


def test_bad_inputs_raise_naming_the_argument(trained, data):
    with pytest.raises(ValueError, match=r"x: .*\[0, 1\]"):
        am.elbo(trained.model, trained.params, jax.random.key(0), data.x_test * 16.0)
    with pytest.raises(ValueError, match="data_dim=64"):
        am.iwae_bound(trained.model, trained.params, jax.random.key(0), data.x_test[:, :10])
    with pytest.raises(ValueError, match="batch_size"):
        am.train(jax.random.key(0), data.x_test[:10], batch_size=20, progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        am.VAE(data_dim=64, latent_dim=0)


def test_train_passes_the_loss_to_optimizers_that_take_it(data):
    # reduce_on_plateau's update requires value= (optax's TypeError without it).
    opt = optax.chain(optax.adam(1e-3), optax.contrib.reduce_on_plateau())
    res = am.train(jax.random.key(0), data.x_train[:64], hidden=(16,), num_steps=20,
                   batch_size=16, steps_per_chunk=10, optimizer=opt, progress=False)
    assert np.all(np.isfinite(np.asarray(res.losses)))


def test_train_stops_on_a_non_finite_step_and_keeps_the_last_finite_parameters():
    # optax.sgd(1e4) diverges at step 2: it came back as NaN losses and NaN parameters,
    # silently (found in review). Now a warning names the step, and the parameters are those
    # of the steps before it (the chunk's finite steps replayed).
    x = (np.random.default_rng(0).random((64, 6)) < 0.3).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss or parameters at step 2 .*first 2"):
        res = am.train(jax.random.key(0), x, hidden=(8,), num_steps=40, batch_size=16,
                       steps_per_chunk=20, optimizer=optax.sgd(1e4), progress=False)
    assert res.losses.shape == (2,) and np.all(np.isfinite(res.losses))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(res.params))
    # NaN in the data fails both range comparisons: named instead.
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"x_train: 1 NaN/inf entries out of 384"):
        am.train(jax.random.key(0), x, hidden=(8,), num_steps=4, batch_size=16, progress=False)


def test_elbo_and_iwae_check_their_sample_counts():
    model = am.VAE(data_dim=4, latent_dim=2, hidden=(8,))
    params = model.init(jax.random.key(0))
    x = jnp.ones((3, 4))
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match=r"elbo\(num_samples=\.\.\.\)"):
            am.elbo(model, params, jax.random.key(1), x, num_samples=bad)
        with pytest.raises(ValueError, match=r"iwae_bound\(chunk_size=\.\.\.\)"):
            am.iwae_bound(model, params, jax.random.key(1), x, num_samples=10, chunk_size=bad)


def test_train_refuses_a_model_with_other_sizes():
    x = (np.random.default_rng(0).random((32, 6)) < 0.3).astype(np.float32)
    with pytest.raises(ValueError, match="pass model= or latent_dim=/hidden=, not both"):
        am.train(jax.random.key(0), x, model=am.VAE(6, 3, (8,)), latent_dim=2 + 1,
                 num_steps=2, batch_size=8, progress=False)
