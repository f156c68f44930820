"""Tests for vi_engine.measures: scipy references, the seed's numbers, properties, numerics."""

import doctest
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy as sp_entropy

import vi_engine
from vi_engine import measures as m

PROPS = settings(max_examples=40, deadline=None)


# JAX compiles once per shape and dtype; calling op by op compiles every primitive, so the
# tests go through these few jitted bundles (base is traced: both bases share a compilation).
def _pair_measures(p, q, base, axis=-1, log_input=False):
    kw = dict(axis=axis, base=base, log_input=log_input)
    return dict(
        h=m.entropy(p, **kw),
        ce=m.cross_entropy(p, q, **kw),
        kl=m.kl_divergence(p, q, **kw),
        jsd=m.js_divergence(p, q, **kw),
        jsdist=m.js_distance(p, q, **kw),
    )


def _joint_measures(joint, base, log_input=False):
    kw = dict(base=base, log_input=log_input)
    return dict(mi=m.mutual_information(joint, **kw), hc=m.conditional_entropy(joint, **kw))


pair_measures = jax.jit(_pair_measures, static_argnames=("axis", "log_input"))
joint_measures = jax.jit(_joint_measures, static_argnames=("log_input",))
entropy = jax.jit(m.entropy, static_argnames=("axis", "log_input"))


def random_simplex(rng, shape, axis=-1, zeros=0.0):
    """Random probability tables along ``axis``, optionally with a fraction of exact zeros."""
    x = rng.gamma(0.7, size=shape)
    if zeros:
        x = np.where(rng.uniform(size=shape) < zeros, 0.0, x)
        first = np.moveaxis(x, axis, -1)
        first[..., 0] += 0.1  # no all-zero rows
    return x / x.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# Against scipy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((3, 5), -1), ((4, 3, 5), 1), ((5, 3), 0)])
def test_against_scipy(shape, axis):
    rng = np.random.default_rng(0)
    p = random_simplex(rng, shape, axis, zeros=0.2)
    q = random_simplex(rng, shape, axis, zeros=0.0)
    with np.errstate(divide="ignore"):
        lp, lq = np.log(p), np.log(q)
    for base in (math.e, 2.0):  # nats (base=None is checked against e elsewhere) and bits
        f = math.log(base)
        got = pair_measures(p, q, base, axis=axis)
        close = lambda a, b, atol=0.0: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
        close(got["h"], sp_entropy(p, axis=axis, base=base))
        close(got["kl"], sp_entropy(p, q, axis=axis, base=base))
        close(got["kl"], rel_entr(p, q).sum(axis=axis) / f)
        close(got["ce"], -(p * np.log(q)).sum(axis=axis) / f)
        ref = jensenshannon(p, q, axis=axis, base=base)
        close(got["jsdist"], ref, atol=1e-6)
        close(got["jsd"], ref**2, atol=1e-7)
        # log_input gives the same numbers (shifted logits: it normalises)
        got_log = pair_measures(lp + 2.0, lq - 1.0, base, axis=axis, log_input=True)
        for k in got:
            close(got_log[k], got[k], atol=1e-6)


def test_broadcasting_against_scipy():
    rng = np.random.default_rng(1)
    p = random_simplex(rng, (4, 1, 5))
    q = random_simplex(rng, (3, 5))
    got = pair_measures(p, q, None)
    assert got["kl"].shape == (4, 3)
    np.testing.assert_allclose(got["kl"], rel_entr(p, q).sum(-1), rtol=1e-5)
    pb, qb = np.broadcast_arrays(p, q)
    np.testing.assert_allclose(got["jsdist"], jensenshannon(pb, qb, axis=-1), rtol=1e-4)


def test_joint_measures_against_scipy():
    rng = np.random.default_rng(2)
    joint = random_simplex(rng, (3, 4 * 5), zeros=0.2).reshape(3, 4, 5)
    hxy = sp_entropy(joint.reshape(3, -1), axis=-1)
    hx, hy = sp_entropy(joint.sum(-1), axis=-1), sp_entropy(joint.sum(-2), axis=-1)
    with np.errstate(divide="ignore"):
        lj = np.log(joint) + 3.0  # unnormalised log table
    for base in (1.0, 2.0):
        f = math.log(base) if base != 1.0 else 1.0
        base = None if base == 1.0 else base
        got = joint_measures(joint, base)
        got_log = joint_measures(lj, base, log_input=True)
        for g in (got, got_log):
            np.testing.assert_allclose(g["hc"], (hxy - hy) / f, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g["mi"], (hx + hy - hxy) / f, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The seed's numbers: Bayesian surprise for the black swan
# --------------------------------------------------------------------------------------------


def black_swan_posterior(prior_black, likelihood_black=0.3):
    """Bayes with hypotheses [black swans exist, all swans are white], one black swan seen.

    P(see a black swan | all white) = 0 rules the second hypothesis out; the likelihood under
    the first cancels in the normalisation, so the posterior is [1, 0] whatever it is.
    """
    prior = np.array([prior_black, 1.0 - prior_black])
    joint = prior * np.array([likelihood_black, 0.0])
    return prior, joint / joint.sum()


@pytest.mark.parametrize("prior_black,bits", [(0.01, math.log2(100)), (0.5, 1.0)])
def test_black_swan_surprise(prior_black, bits):
    prior, posterior = black_swan_posterior(prior_black)
    np.testing.assert_allclose(posterior, [1.0, 0.0])
    got = m.surprise(prior, posterior, base=2)
    np.testing.assert_allclose(got, bits, rtol=1e-6)
    np.testing.assert_allclose(got, -math.log2(prior_black), rtol=1e-6)
    assert got == m.kl_divergence(posterior, prior, base=2)  # surprise = KL(posterior || prior)
    if prior_black == 0.01:
        assert round(float(got), 2) == 6.64
    # and in nats
    np.testing.assert_allclose(m.surprise(prior, posterior), bits * math.log(2), rtol=1e-6)


def test_infinite_surprise():
    # A dogmatic prior that rules out black swans: once one is seen, the only posterior left
    # puts its mass where the prior had none.
    _, posterior = black_swan_posterior(0.01)
    dogmatic = np.array([0.0, 1.0])
    assert m.surprise(dogmatic, posterior) == jnp.inf
    assert m.surprise(dogmatic, posterior, base=2) == jnp.inf
    # ...the limit of ever smaller priors
    priors = np.array([1e-2, 1e-4, 1e-8, 1e-16])
    batch = np.stack([priors, 1 - priors], axis=-1)
    np.testing.assert_allclose(m.surprise(batch, posterior, base=2), -np.log2(priors), rtol=1e-5)
    # and in log space
    lp = jnp.log(jnp.asarray(dogmatic))
    assert m.surprise(lp, jnp.log(jnp.asarray(posterior)), log_input=True) == jnp.inf


# --------------------------------------------------------------------------------------------
# Properties (float64, eager, fixed shapes so primitives compile once)
# --------------------------------------------------------------------------------------------

K = 5
E = math.e  # base=e is nats, like base=None, but shares the compilation with base=2


def simplex(k=K, allow_zeros=True):
    lo = 0.0 if allow_zeros else 1e-3
    w = hnp.arrays(np.float64, (k,), elements=st.floats(lo, 1.0)).filter(lambda a: a.sum() > 1e-3)
    return w.map(lambda a: a / a.sum())


@PROPS
@given(simplex(), simplex())
def test_gibbs_and_pinsker(p, q):
    with jax.enable_x64(True):
        pq, pp = pair_measures(p, q, E), pair_measures(p, p, E)
        kl = float(pq["kl"])
        assert kl >= -1e-15  # rounding only
        # = 0 iff equal: Pinsker's inequality KL >= ||p - q||_1^2 / 2 makes "iff" quantitative
        assert kl >= 0.5 * np.abs(p - q).sum() ** 2 - 1e-12
        assert float(pp["kl"]) == 0.0
        # cross entropy = H + KL
        ce = float(pq["ce"])
        if math.isinf(kl):
            assert ce == math.inf
        else:
            assert math.isclose(ce, float(pq["h"]) + kl, rel_tol=1e-9, abs_tol=1e-12)


_TINY = np.array([1.0] + [np.finfo(np.float64).tiny] * 4)  # half of it is subnormal (flushed)


@PROPS
@given(simplex(), simplex(), simplex())
@example(_TINY, np.full(5, 0.2), np.eye(5)[0])  # found by hypothesis: the JSD of p, r was inf
@example(np.eye(5)[0], _TINY, np.full(5, 0.2))
def test_js_bounds_symmetry_triangle(p, q, r):
    with jax.enable_x64(True):
        pq, qp = pair_measures(p, q, E), pair_measures(q, p, E)
        jsd = float(pq["jsd"])
        assert -1e-15 <= jsd <= math.log(2) + 1e-12
        assert math.isclose(jsd, float(qp["jsd"]), rel_tol=1e-12, abs_tol=1e-15)
        d = lambda a, b: float(pair_measures(a, b, E)["jsdist"])
        assert d(p, p) == 0.0
        assert d(p, r) <= d(p, q) + d(q, r) + 1e-9


@PROPS
@given(simplex(12))
def test_mutual_information_and_chain_rule(flat):
    joint = flat.reshape(3, 4)
    with jax.enable_x64(True):
        xy, yx = joint_measures(joint, None), joint_measures(joint.T, None)
        mi, h_x_given_y, h_y_given_x = float(xy["mi"]), float(xy["hc"]), float(yx["hc"])
        assert mi >= -1e-12
        assert math.isclose(mi, float(yx["mi"]), abs_tol=1e-12)
        hxy = float(entropy(flat))
        hx, hy = float(entropy(joint.sum(1))), float(entropy(joint.sum(0)))
        assert math.isclose(hxy, hy + h_x_given_y, abs_tol=1e-12)  # chain rule
        # I = H(X) - H(X|Y) = H(Y) - H(Y|X)
        assert math.isclose(mi, hx - h_x_given_y, abs_tol=1e-12)
        assert math.isclose(mi, hy - h_y_given_x, abs_tol=1e-12)


@PROPS
@given(simplex(3), simplex(4))
def test_independent_tables_have_zero_mutual_information(px, py):
    with jax.enable_x64(True):
        got = joint_measures(np.outer(px, py), None)
        assert abs(float(got["mi"])) <= 1e-12
        assert math.isclose(float(got["hc"]), float(entropy(px)), abs_tol=1e-12)


@PROPS
@given(simplex(6), hnp.arrays(np.int64, (6,), elements=st.integers(0, 2)))
def test_coarse_graining(fine, groups):
    member = groups[None, :] == np.arange(3)[:, None]  # (group, state)
    with jax.enable_x64(True):
        coarse = (member * fine).sum(1)
        # P(state | g) for each group, as a (3, 6) table; empty groups get weight 0 below
        cond = np.where(member, fine, 0.0) / np.where(coarse > 0, coarse, 1.0)[:, None]
        cond[coarse == 0, 0] = 1.0
        within = float(np.sum(coarse * np.asarray(entropy(cond))))
        h_fine, h_coarse = float(entropy(fine)), float(entropy(coarse))
        assert math.isclose(h_fine, h_coarse + within, abs_tol=1e-12)
        # the same through conditional_entropy: joint[x, g] = p(x) [g(x) = g], H(X|G)
        got = joint_measures(fine[:, None] * member.T, None)
        assert math.isclose(float(got["hc"]), within, abs_tol=1e-12)
        assert math.isclose(float(got["mi"]), h_coarse, abs_tol=1e-12)  # G = g(X)
        assert h_coarse <= h_fine + 1e-12


def test_near_identical_tables_are_accurate_and_nonnegative():
    # float32 rows a relative 1e-4 apart (found in review: KL negative in 47% of rows, JSD 34x
    # too large, MI of independent tables negative): against float64 scipy on the same numbers.
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(6), 500)
    q = p * (1 + 1e-4 * rng.standard_normal(p.shape))
    p32, q32 = p.astype(np.float32), (q / q.sum(-1, keepdims=True)).astype(np.float32)
    pd, qd = (a.astype(np.float64) / a.astype(np.float64).sum(-1, keepdims=True)
              for a in (p32, q32))
    kl_ref = rel_entr(pd, qd).sum(-1)
    mid = 0.5 * (pd + qd)
    jsd_ref = 0.5 * (rel_entr(pd, mid).sum(-1) + rel_entr(qd, mid).sum(-1))
    kl, jsd = np.asarray(m.kl_divergence(p32, q32)), np.asarray(m.js_divergence(p32, q32))
    assert kl.min() > 0 and jsd.min() > 0
    assert np.median(np.abs(kl / kl_ref - 1)) < 1e-4
    assert np.median(np.abs(jsd / jsd_ref - 1)) < 1e-4
    np.testing.assert_allclose(m.js_distance(p32, q32), np.sqrt(jsd_ref), rtol=1e-2)
    # both paths agree (the log path's own rounding of log p is its floor: 1e-3 here)
    kl_log = m.kl_divergence(np.log(p32), np.log(q32), log_input=True)
    np.testing.assert_allclose(kl_log, kl_ref, rtol=0.05)
    # the same with a single ulp between them: tiny, not 0 or negative
    a, b = jnp.array([0.5, 0.5]), jnp.array([0.500001, 0.499999])
    np.testing.assert_allclose(m.kl_divergence(a, b), 2e-12, rtol=0.05)
    assert 0 < float(m.js_distance(jnp.array([0.3, 0.7]), jnp.array([0.3000001, 0.6999999])))
    # independent float32 tables: MI is 0 up to rounding, never negative
    px, py = rng.dirichlet(np.ones(3), 200), rng.dirichlet(np.ones(4), 200)
    joint = (px[:, :, None] * py[:, None, :]).astype(np.float32)
    for mi in (m.mutual_information(joint), m.mutual_information(np.log(joint), log_input=True)):
        assert 0 <= np.min(mi) and np.max(mi) < 1e-12


def test_entropy_maximal_for_uniform():
    rng = np.random.default_rng(3)
    p = random_simplex(rng, (50, 8))
    assert np.all(np.asarray(m.entropy(p, base=2)) <= 3.0 + 1e-6)
    np.testing.assert_allclose(m.entropy(np.full(8, 1 / 8), base=2), 3.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Zeros, infinities, gradients
# --------------------------------------------------------------------------------------------


def test_zero_handling():
    p = jnp.array([0.5, 0.5, 0.0])
    q = jnp.array([0.25, 0.25, 0.5])
    np.testing.assert_allclose(m.entropy(p), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(m.kl_divergence(p, q), math.log(2), rtol=1e-6)
    assert m.kl_divergence(q, p) == jnp.inf
    assert m.cross_entropy(q, p) == jnp.inf
    np.testing.assert_allclose(m.js_divergence(q, p), m.js_divergence(p, q), rtol=1e-6)
    assert np.isfinite(m.js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])))
    assert m.entropy(jnp.array([1.0, 0.0, 0.0])) == 0.0
    # batched: only the bad row is infinite, nothing is NaN
    out = m.kl_divergence(jnp.stack([p, q]), jnp.stack([q, p]))
    assert np.isfinite(out[0]) and out[1] == jnp.inf
    joint = jnp.array([[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(m.mutual_information(joint, base=2), 1.0, rtol=1e-6)
    assert m.conditional_entropy(joint) == 0.0


def _all_grads(a, b, joint, log_input):
    """Gradients of every measure, w.r.t. every argument (one compilation per mode)."""
    kw = dict(log_input=log_input)
    pair = (m.kl_divergence, m.cross_entropy, m.js_divergence, m.js_distance)  # surprise = kl
    out = {f.__name__: jax.grad(lambda a, b: f(a, b, **kw), argnums=(0, 1))(a, b) for f in pair}
    out["entropy"] = jax.grad(lambda a: m.entropy(a, **kw))(a)
    for f in (m.mutual_information, m.conditional_entropy):
        out[f.__name__] = jax.grad(lambda j: f(j, **kw))(joint)
    return out


all_grads = jax.jit(jax.vmap(_all_grads, (0, 0, None, None)), static_argnums=3)


# Pairs (a[i], b[i]): one without zeros (for closed forms), then zeros in p, in q, in both.
P0, Q0 = np.array([0.2, 0.3, 0.5]), np.array([0.1, 0.6, 0.3])
P, Q, ZQ = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5]), np.array([0.0, 0.5, 0.5])
GRAD_A, GRAD_B = np.stack([P0, P, P, ZQ, P]), np.stack([Q0, Q, ZQ, P, P])
GRAD_JOINT = np.array([[0.5, 0.0], [0.0, 0.5]])


def _assert_finite(grads):
    for name, g in grads.items():
        for leaf in jax.tree.leaves(g):
            assert np.all(np.isfinite(leaf)), (name, leaf)


def test_gradients_at_zeros_probabilities():
    grads = all_grads(GRAD_A, GRAD_B, GRAD_JOINT, False)
    _assert_finite(grads)
    gp, gq = grads["kl_divergence"]
    # The generalised KL's (sum p log(p/q) - p + q): the textbook's minus 1 and plus 1, the
    # same along the simplex (whose tangents sum to 0).
    np.testing.assert_allclose(gp[0], np.log(P0 / Q0), rtol=1e-5)
    np.testing.assert_allclose(gq[0], 1 - P0 / Q0, rtol=1e-5)
    # d/dp of -p log p at p = 0 is taken as 0 (double where), elsewhere -(1 + log p)
    np.testing.assert_allclose(grads["entropy"][1], [-(1 + np.log(0.5))] * 2 + [0.0], rtol=1e-5)


def test_gradients_at_zeros_log_space():
    with np.errstate(divide="ignore"):
        a, b, joint = np.log(GRAD_A) + 1.7, np.log(GRAD_B), np.log(GRAD_JOINT)
    grads = all_grads(a.astype(np.float32), b.astype(np.float32), joint, True)
    _assert_finite(grads)
    # through logits: d KL(softmax(a) || q) / da = p * (log(p / q) - KL)
    kl = float(np.sum(P0 * np.log(P0 / Q0)))
    np.testing.assert_allclose(
        grads["kl_divergence"][0][0], P0 * (np.log(P0 / Q0) - kl), rtol=1e-4, atol=1e-7
    )


# --------------------------------------------------------------------------------------------
# Log space: tiny probabilities in float64, huge logits in float32
# --------------------------------------------------------------------------------------------


def test_log_space_float64_tiny_probabilities():
    x, y = 1e-300, 1e-250
    with jax.enable_x64(True):
        lp = jnp.array([math.log(x), math.log1p(-x)])
        lq = jnp.array([math.log(y), math.log1p(-y)])
        assert lp.dtype == jnp.float64
        # H = -x log x - (1-x) log(1-x), and -(1-x) log1p(-x) = x to double precision
        h = m.entropy(lp, log_input=True)
        assert h.dtype == jnp.float64
        np.testing.assert_allclose(h, -x * math.log(x) + x, rtol=1e-12)
        # KL = x log(x/y) + (1-x) log((1-x)/(1-y)) = y - x + x log(x/y) + O(y^2)
        kl = m.kl_divergence(lp, lq, log_input=True)
        np.testing.assert_allclose(kl, y - x + x * math.log(x / y), rtol=1e-12)
        # The probability path cannot see 1 - 1e-300, but its generalised KL (+ q - p per
        # entry) restores the mass the rounding lost (the textbook formula gave -1.1e-298).
        np.testing.assert_allclose(m.kl_divergence(jnp.exp(lp), jnp.exp(lq)),
                                   y - x + x * math.log(x / y), rtol=1e-12)
        # probabilities ~ exp(-1000) underflow even in float64; the log path is shift-invariant
        a = jnp.array([-1000.0, -1001.0, -1003.0])
        np.testing.assert_allclose(
            m.entropy(a, log_input=True), m.entropy(a + 1000, log_input=True), rtol=1e-14
        )
        np.testing.assert_allclose(
            m.js_divergence(a, a[::-1], log_input=True),
            m.js_divergence(a + 1000, a[::-1] + 1000, log_input=True),
            rtol=1e-12,
        )


def test_log_space_float32_huge_logits():
    a = np.array([1e4, -1e4, -1e4], dtype=np.float32)
    b = np.array([-1e4, 1e4, -1e4], dtype=np.float32)
    got = pair_measures(a, b, None, log_input=True)
    assert got["kl"] == pytest.approx(2e4, rel=1e-6)
    assert got["ce"] == pytest.approx(2e4, rel=1e-6)
    assert got["jsd"] == pytest.approx(math.log(2), rel=1e-6)
    assert got["h"] == 0.0
    assert all(v.dtype == jnp.float32 for v in got.values())
    assert pair_measures(a, a, None, log_input=True)["kl"] == 0.0
    # moderate logits against a closed form: KL(softmax([30, -30, -30]) || uniform)
    e = math.exp(-60.0)
    ps = np.array([1.0, e, e]) / (1 + 2 * e)
    h = -np.sum(ps * (np.array([0.0, -60.0, -60.0]) - math.log1p(2 * e)))
    kl = pair_measures(np.array([30.0, -30.0, -30.0]), np.zeros(3), None, log_input=True)["kl"]
    np.testing.assert_allclose(kl, math.log(3) - h, rtol=1e-6)
    # gradients finite with huge logits (same shapes as above: no new compilation)
    big_a, big_b = np.stack([a, a, b, a, b]), np.stack([b, a, a, -a, -b])
    _assert_finite(all_grads(big_a, big_b, np.zeros((2, 2), np.float32), True))


def test_float64_dtype_follows_inputs():
    with jax.enable_x64(True):
        p = jnp.array([0.2, 0.8], dtype=jnp.float64)
        assert m.entropy(p).dtype == jnp.float64
        assert m.kl_divergence(p, p[::-1], base=2).dtype == jnp.float64
        assert m.entropy(p.astype(jnp.float32)).dtype == jnp.float32
        assert m.mutual_information(jnp.outer(p, p)).dtype == jnp.float64


# --------------------------------------------------------------------------------------------
# jit / vmap / grad, strict promotion
# --------------------------------------------------------------------------------------------

_jit_kl = jax.jit(m.kl_divergence, static_argnames=("axis", "base", "log_input"))
_jit_jsdist = jax.jit(m.js_distance)


def test_jit_vmap():
    rng = np.random.default_rng(4)
    p, q = random_simplex(rng, (6, 4)), random_simplex(rng, (6, 4))
    ref = m.kl_divergence(p, q)
    np.testing.assert_allclose(_jit_kl(p, q), ref, rtol=1e-6)
    np.testing.assert_allclose(_jit_kl(p.T, q.T, axis=0, base=2), ref / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(m.kl_divergence)(p, q), ref, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(m.js_distance, (0, None))(p, q[0]), _jit_jsdist(p, q[0]))
    np.testing.assert_allclose(
        jax.vmap(lambda a: m.entropy(a, axis=0), in_axes=1)(p.T), m.entropy(p), rtol=1e-6
    )
    joints = p[:, :, None] * q[:, None, :]
    np.testing.assert_allclose(
        jax.jit(jax.vmap(m.mutual_information))(joints), np.zeros(6), atol=1e-6
    )
    # validate=True is skipped (not an error) under tracing
    np.testing.assert_allclose(
        jax.jit(lambda a, b: m.kl_divergence(a, b, validate=True))(p, q), ref, rtol=1e-6
    )
    # traced base
    np.testing.assert_allclose(
        jax.jit(lambda a, b, base: m.entropy(a, base=base))(p, q, 2.0),
        np.asarray(m.entropy(p)) / math.log(2),
        rtol=1e-6,
    )
    g = jax.jit(jax.grad(lambda a: jnp.sum(m.js_distance(a, q))))(p)
    assert g.shape == p.shape and np.all(np.isfinite(g))


def test_strict_promotion_and_rank_promotion():
    p = jnp.array([[0.2, 0.8], [0.5, 0.5]])
    q = jnp.array([0.3, 0.7])
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        got = pair_measures(p, q, 2.0)
        got_log = pair_measures(jnp.log(p), jnp.log(q), None, log_input=True)
        for k in got:
            assert got[k].shape == got_log[k].shape == (2,)
        assert joint_measures(p[None], 2.0)["mi"].shape == (1,)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        m.kl_divergence(jnp.ones((2, 3)) / 3, jnp.ones((2, 4)) / 4)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 3\).*broadcast"):
        m.js_divergence(jnp.ones((2, 3)) / 3, jnp.ones((4, 3)) / 3)
    with pytest.raises(ValueError, match=r"posterior.*\(4,\).*prior.*\(3,\)"):
        m.surprise(jnp.ones(3) / 3, jnp.ones(4) / 4)
    with pytest.raises(ValueError, match=r"axis=2.*\(3, 2\)"):
        m.entropy(jnp.ones((3, 2)) / 2, axis=2)
    with pytest.raises(ValueError, match=r"two dimensions.*\(4,\)"):
        m.mutual_information(jnp.ones(4) / 4)
    with pytest.raises(ValueError, match="base"):
        m.entropy(jnp.ones(2) / 2, base=1)
    # Array bases are checked when their values are known; a bool is not a base.
    for bad in (jnp.array(1.0), jnp.array(-2.0), np.array([2.0, 0.0])):
        with pytest.raises(ValueError, match="base must be positive, finite and != 1"):
            m.entropy(jnp.ones(2) / 2, base=bad)
    for bad in (True, jnp.array(True)):
        with pytest.raises(TypeError, match="base must be a number"):
            m.entropy(jnp.ones(2) / 2, base=bad)
    assert float(m.entropy(jnp.ones(2) / 2, base=jnp.array(2.0))) == 1.0
    assert float(m.entropy(jnp.ones(2) / 2, base=jnp.bfloat16(2))) == 1.0  # NumPy kind "V"
    assert float(jax.jit(lambda b: m.entropy(jnp.ones(2) / 2, base=b))(2.0)) == 1.0


@pytest.mark.parametrize("jit", [False, True])
def test_invalid_entries_are_nan_not_dropped(jit):
    # Unchecked (validate=False, or any call under jit): a NaN or a negative entry must show in
    # the result as NaN, never be treated as zero mass (which gave finite, wrong values).
    wrap = jax.jit if jit else (lambda f: f)
    m = types.SimpleNamespace(**{  # every measure unchecked (validate=True is the default)
        name: functools.partial(getattr(vi_engine.measures, name), validate=False)
        for name in ("kl_divergence", "cross_entropy", "js_divergence", "js_distance",
                     "entropy", "mutual_information", "conditional_entropy")})
    nan = jnp.nan
    p_nan, p_neg, q = jnp.array([nan, 0.5, 0.5]), jnp.array([1.5, -0.5, 0.0]), jnp.full(3, 1 / 3)
    for p in (p_nan, p_neg):
        for fn in (m.kl_divergence, m.cross_entropy, m.js_divergence, m.js_distance):
            assert np.isnan(wrap(fn)(p, q)) and np.isnan(wrap(fn)(q, p)), fn.__name__
        assert np.isnan(wrap(m.entropy)(p))
    # NaN in p where q = 0: NaN, not the +inf of an infinite surprise.
    assert np.isnan(wrap(m.kl_divergence)(p_nan, jnp.array([0.0, 0.5, 0.5])))
    assert np.isnan(wrap(lambda x: m.entropy(x, log_input=True))(jnp.array([nan, 0.0, 0.0])))
    joint = jnp.array([[nan, 0.5], [0.25, 0.25]])
    assert np.isnan(wrap(m.mutual_information)(joint))
    assert np.isnan(wrap(m.conditional_entropy)(joint))
    # Exact zeros are still 0 log 0 = 0, with finite gradients.
    p0 = jnp.array([0.5, 0.5, 0.0])
    assert np.isfinite(wrap(m.kl_divergence)(p0, q))
    assert np.all(np.isfinite(jax.grad(lambda p: m.kl_divergence(p, q))(p0)))
    # and a zero joint entry passes no gradient through the marginals either (as before).
    joint0 = jnp.array([[0.5, 0.0], [0.25, 0.25]])
    assert float(wrap(jax.grad(m.mutual_information))(joint0)[0, 1]) == 0.0
    assert float(wrap(jax.grad(m.conditional_entropy))(joint0)[0, 1]) == 0.0


def test_complex_tables_and_non_integer_axes_are_named():
    # A complex table was cast to its real part; a tuple or float axis raised a bare
    # TypeError (found in review).
    with pytest.raises(TypeError, match="p: expected real probabilities, got dtype complex"):
        m.entropy(jnp.array([0.5 + 1j, 0.5]))
    for axis in ((0, 1), 1.0):
        with pytest.raises(TypeError, match="axis: expected an integer"):
            m.entropy(jnp.full((2, 2), 0.5), axis=axis)
        with pytest.raises(TypeError, match="axis: expected an integer"):
            m.kl_divergence(jnp.full((2, 2), 0.5), jnp.full((2, 2), 0.5), axis=axis)


def test_validate_tolerance_does_not_grow_with_the_table_length():
    # A float32 row of K = 50,000 summing to 1.07 passed a √K-scaled tolerance, and its
    # entropy exceeded log K (found in review); a float32 softmax row of that length is within
    # 1e-6 and passes.
    k = 50_000
    with pytest.raises(ValueError, match=r"sums to 1\.0(7|69)"):
        m.entropy(jnp.full((k,), 1.07 / k, jnp.float32), validate=True)
    row = jax.nn.softmax(jax.random.normal(jax.random.key(0), (k,)))
    assert float(m.entropy(row, validate=True)) <= np.log(k)


def test_validate_reports_offending_values():
    with pytest.raises(ValueError, match=r"-0\.1.*index \(1,\)"):
        m.entropy(jnp.array([0.6, -0.1, 0.5]), validate=True)
    with pytest.raises(ValueError, match=r"q row \(1,\).*sums to 0\.(89|90)"):
        m.kl_divergence(
            jnp.array([0.5, 0.5]), jnp.array([[0.5, 0.5], [0.4, 0.5]]), validate=True
        )
    with pytest.raises(ValueError, match=r"row \(0, 1\)"):
        m.entropy(jnp.array([[[1.0, 0.0], [0.3, 0.3]]]), validate=True)
    with pytest.raises(ValueError, match=r"joint row \(\).*sums to 2"):
        m.mutual_information(jnp.ones((2, 2)) / 2, validate=True)
    with pytest.raises(ValueError, match=r"nan.*finite or -inf"):
        m.entropy(jnp.array([0.0, jnp.nan]), log_input=True, validate=True)
    with pytest.raises(ValueError, match=r"all -inf"):
        m.entropy(jnp.array([-jnp.inf, -jnp.inf]), log_input=True, validate=True)
    # valid inputs (with zeros, unnormalised logits) pass
    m.kl_divergence(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), validate=True)
    # It is the default (found in review: a negative entry gave a silent NaN, an unnormalised
    # joint a mutual information of -5.5), and under jit values are not checked.
    with pytest.raises(ValueError, match=r"-0\.1.*index \(1,\)"):
        m.entropy(jnp.array([0.6, -0.1, 0.5]))
    with pytest.raises(ValueError, match=r"joint row \(\).*sums to 4"):
        m.mutual_information(jnp.ones((2, 2)))
    assert np.isnan(jax.jit(m.entropy)(jnp.array([0.6, -0.1, 0.5])))
    # a valid bfloat16 softmax passes (its row sums were taken in bfloat16, review)
    x = np.random.default_rng(0).normal(size=(4, 50))
    assert np.all(np.isfinite(m.entropy(jax.nn.softmax(jnp.asarray(x, jnp.bfloat16), -1))))
    m.entropy(jnp.array([3.0, -jnp.inf, 1.0]), log_input=True, validate=True)


# --------------------------------------------------------------------------------------------
# Docs and exports
# --------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(m, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


def test_public_exports():
    for name in (
        "entropy",
        "cross_entropy",
        "js_divergence",
        "js_distance",
        "mutual_information",
        "conditional_entropy",
    ):
        assert getattr(vi_engine, name) is getattr(m, name)
        assert name in vi_engine.__all__
    for name in m.__all__:
        doc = getattr(m, name).__doc__
        assert "Example" in doc and ">>>" in doc and "(...)" in doc and "Reference" in doc
