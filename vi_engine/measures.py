"""Information measures on (batched) discrete probability tables.

Entropy, cross entropy, KL and Jensen-Shannon divergences, mutual information, conditional
entropy and Bayesian surprise, as pure JAX functions: jit-, vmap- and grad-safe, batched over
leading dimensions, with the dtype taken from the inputs (float64 works under x64).

Conventions shared by every function here:

* ``p: (..., K)`` holds probabilities along ``axis`` (default the last); leading dimensions are a
  batch, and two-argument functions broadcast ``p`` and ``q`` against each other.
* ``base=None`` gives nats, ``base=2`` bits, any other positive ``base != 1`` that unit.
* ``0 * log 0 = 0``; mass of ``p`` where ``q`` is zero gives exactly ``+inf`` (never NaN).
  Gradients stay finite where ``p`` has zeros (the "double where" trick).
* ``log_input=True``: the inputs are log-probabilities or unnormalised logits. They are
  normalised along ``axis`` with an accurate log-softmax, and ``-inf`` means probability zero.
  Use it when probabilities underflow (logits of +-1e4 in float32, probabilities near 1e-300 in
  float64): everything is then computed from log-probabilities, never from ``log(exp(.))``.
* ``validate=True`` (the default) checks values eagerly when they are concrete (skipped under
  jit/vmap/grad tracing): no negative or NaN entries and rows summing to 1 (or, with
  ``log_input=True``, no NaN or ``+inf`` and at least one finite entry per row), so that a bad
  table is an error naming the entry, not a NaN or a meaningless number (an unnormalised joint
  gave a mutual information of -5.5). It reads the values on the host: ``validate=False``
  skips that round trip for large eager batches. Shapes are always checked.

The probability path does not renormalise ``p``: unlike ``scipy.stats.entropy`` it computes
the formula on the numbers given (with ``validate=False``; by default unnormalised rows are
an error). KL divergences (and mutual information, surprise) are computed as the generalised KL
``sum_k p_k log(p_k / q_k) - p_k + q_k``, equal to KL for tables that sum to 1 but a sum of
terms that are each ``>= 0``: accurate for near-identical tables (float32 rows a relative 1e-4
apart: median relative error 6e-8, where ``sum p log(p/q)`` was off by 55% and negative in half
the rows), and ``>= 0`` even where rounding leaves a row's sum a few ulps off 1. Its gradients
are the textbook's minus 1 (in ``p``) and plus 1 (in ``q``), the same along the simplex.

References: Cover & Thomas, *Elements of Information Theory* (2nd ed., 2006), ch. 2; Lin (1991),
"Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1); Endres &
Schindelin (2003), "A new metric for probability distributions", IEEE Trans. Inf. Theory 49(7);
Itti & Baldi (2005), "Bayesian surprise attracts human attention", NIPS.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "conditional_entropy",
    "cross_entropy",
    "entropy",
    "js_distance",
    "js_divergence",
    "kl_divergence",
    "mutual_information",
    "surprise",
]


class _Table(NamedTuple):
    """A distribution along the last axis: probabilities, safe log-probabilities, support."""

    prob: jax.Array  # 0 outside the support
    logp: jax.Array  # finite everywhere: log p on the support, 0 outside (double-where safe)
    pos: jax.Array  # bool, p > 0 (or log p > -inf)


# --------------------------------------------------------------------------------------------
# Boundary: shapes, dtypes, eager value checks
# --------------------------------------------------------------------------------------------


def _as_float(*xs):
    arrays = [jnp.asarray(x) for x in xs]
    dtype = jnp.result_type(*[a.dtype for a in arrays])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return [a.astype(dtype) for a in arrays]


def _check_axis_type(axis):
    """One event axis, an integer: a tuple or a float raised a bare TypeError (found in
    review)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis: expected an integer (the event axis), got {axis!r}")


def _check_real(name, x):
    """Probabilities (or logits) are real: a complex table was cast to its real part."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name}: expected real probabilities, got dtype {x.dtype}")


def _check_axis(name, shape, axis):
    _check_axis_type(axis)
    nd = len(shape)
    if nd == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the event axis), got shape {shape}."
        )
    if not -nd <= axis < nd:
        raise ValueError(f"axis={axis} is out of range for {name} with shape {shape} ({nd}-d).")
    return axis % nd


def _check_base(base):
    """``base``: None (nats), or positive, finite and != 1: a number, or an array checked when
    its values are known (not under jit)."""
    if base is None:
        return
    if isinstance(base, (bool, np.bool_)) or (
        hasattr(base, "dtype") and jnp.issubdtype(base.dtype, jnp.bool_)
    ):
        raise TypeError(f"base must be a number (or None for nats); got {base!r}.")
    if isinstance(base, jax.core.Tracer):
        return
    values = np.asarray(base)
    if values.dtype.kind not in "iuf":  # bfloat16 arrives as kind "V": compare it as a float
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            pass
    if values.dtype.kind not in "iuf" or not (
        np.all(values > 0) and np.all(values != 1) and np.all(np.isfinite(values))
    ):
        raise ValueError(
            f"base must be positive, finite and != 1 (or None for nats); got {base!r}."
        )


def _is_concrete(x):
    return not isinstance(x, jax.core.Tracer)


def _validate(name, x, log_input):
    """Eager value checks on ``x`` with the event axis last; skipped for tracers."""
    if not _is_concrete(x):
        return
    a = np.asarray(x)
    if a.size == 0:
        return
    if log_input:
        bad = np.isnan(a) | (a == np.inf)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} (log_input=True) has the entry {a[idx]} at index {idx} (event axis "
                "last); log-probabilities must be finite or -inf."
            )
        empty = np.all(a == -np.inf, axis=-1)
        if empty.any():
            row = tuple(int(i) for i in np.argwhere(empty)[0])
            raise ValueError(
                f"{name} (log_input=True) row {row} is all -inf: it has no probability mass."
            )
        return
    bad = np.isnan(a) | (a < 0)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} has the entry {a[idx]} at index {idx} (event axis last); probabilities "
            "must be non-negative. For log-probabilities or logits pass log_input=True."
        )
    # jnp.finfo knows bfloat16 (np.finfo does not); the sums in float64, not the input's
    # precision (a valid bfloat16 softmax row summed to 0.996 in bfloat16, found in review).
    # Not scaled with the row's length K: each entry's rounding is relative and the sum is taken
    # in float64, so a normalized row's error does not grow with K (a float32 softmax row of
    # K = 250,000 is 1.2e-7 off), whereas a tolerance of √K·√eps let a float32 row of K = 50,000
    # summing to 1.07 through, and its entropy exceed log K (found in review).
    ftype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else np.float32
    tol = math.sqrt(float(jnp.finfo(ftype).eps))
    sums = a.astype(np.float64).sum(axis=-1)
    off = np.abs(sums - 1.0) > tol
    if off.any():
        row = tuple(int(i) for i in np.argwhere(off)[0])
        raise ValueError(
            f"{name} row {row} (batch index) sums to {float(sums[row]):.9g}, not 1 (tolerance "
            f"{tol:.1e}); normalise it, e.g. p / p.sum(axis, keepdims=True)."
        )


def _array(x):
    """Arrays and tracers pass through; lists and scalars become jax arrays (no compilation)."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else jnp.asarray(x)


def _shape(x):
    return tuple(x.shape)


def _host(x, axis):
    """Concrete values with the event axis last, for validation (None for tracers)."""
    if not _is_concrete(x):
        return None
    return np.moveaxis(np.asarray(x), axis, -1)


def _prepare_one(name, x, axis, log_input, validate):
    _check_real(name, x)
    ax = _check_axis(name, _shape(x), axis)
    if validate and (h := _host(x, ax)) is not None:
        _validate(name, h, log_input)
    return ax


def _prepare_pair(names, p, q, axis, log_input, validate):
    """Check event sizes and batch broadcasting; return static axes and the output shape."""
    _check_axis_type(axis)
    for name, x in zip(names, (p, q), strict=True):
        _check_real(name, x)
    (n_p, n_q), sp, sq = names, _shape(p), _shape(q)
    for name, s in zip(names, (sp, sq), strict=True):
        if len(s) == 0:
            raise ValueError(f"{name} must have at least one dimension, got shape {s}.")
    nd = max(len(sp), len(sq))
    if not -nd <= axis < nd:
        raise ValueError(
            f"axis={axis} is out of range for {n_p} with shape {sp} and {n_q} with shape {sq}."
        )
    ax = axis % nd
    ax_p, ax_q = ax - (nd - len(sp)), ax - (nd - len(sq))
    if ax_p < 0 or ax_q < 0:
        raise ValueError(
            f"axis={axis} does not exist in both {n_p} with shape {sp} and {n_q} with shape {sq} "
            "(shapes are aligned from the right, as in broadcasting); use a negative axis."
        )
    if sp[ax_p] != sq[ax_q]:
        raise ValueError(
            f"event sizes along axis={axis} differ: {n_p} has shape {sp} (K={sp[ax_p]}) and "
            f"{n_q} has shape {sq} (K={sq[ax_q]}); they must be equal."
        )
    try:
        shape = np.broadcast_shapes(sp, sq)
    except ValueError:
        raise ValueError(
            f"{n_p} with shape {sp} and {n_q} with shape {sq} do not broadcast against each "
            "other (batch dimensions must be equal or 1)."
        ) from None
    if validate:
        for name, x, a in ((n_p, p, ax_p), (n_q, q, ax_q)):
            if (h := _host(x, a)) is not None:
                _validate(name, h, log_input)
    out = shape[:ax] + shape[ax + 1 :] + shape[ax : ax + 1]
    return (ax_p, ax_q), out


# --------------------------------------------------------------------------------------------
# Numerical kernels (event axis last)
# --------------------------------------------------------------------------------------------


def _logsumexp(x, axis=-1):
    """log(sum(exp(x))) with keepdims, exact for already-normalised inputs.

    Written as ``x_j + log1p(sum_{i != j} exp(x_i - x_j))`` with ``j`` the argmax, so that
    ``[log 1e-300, log1p(-1e-300)]`` normalises to itself; the textbook ``m + log(sum)`` rounds
    ``1 + 1e-300`` to 1 and shifts every entry. Rows of all ``-inf`` give ``-inf``; gradients are
    softmax (also with ties, since the max enters through ``take_along_axis``, not ``max``).
    """
    j = jnp.argmax(x, axis=axis, keepdims=True)
    xj = jnp.take_along_axis(x, j, axis=axis)
    finite = jnp.isfinite(xj)
    xj_safe = jnp.where(finite, xj, 0)
    idx = jax.lax.broadcasted_iota(j.dtype, x.shape, axis % x.ndim)
    rest = jnp.sum(jnp.where(idx == j, 0, jnp.exp(x - xj_safe)), axis=axis, keepdims=True)
    return jnp.where(finite, xj_safe + jnp.log1p(rest), xj)


def _from_prob(p):
    # Exact zeros are masked (0 log 0 = 0), nothing else: a NaN or a negative entry (invalid,
    # unchecked under jit or with validate=False) makes the result NaN rather than vanish.
    pos = p != 0
    logp = jnp.log(jnp.where(pos, p, 1))
    # A zero entry's mass is the constant 0 (no gradient through it, as before); NaN otherwise.
    return _Table(jnp.where(p > 0, p, jnp.where(p == 0, 0.0, jnp.nan)), logp, pos)


def _from_log(logp, normalized=True):
    if normalized:
        logp = logp - _logsumexp(logp, axis=-1)
    pos = logp != -jnp.inf  # NaN stays in, as in _from_prob
    logp_safe = jnp.where(pos, logp, 0)
    return _Table(jnp.where(pos, jnp.exp(logp_safe), 0), logp_safe, pos)


def _table(x, log_input):
    return _from_log(x) if log_input else _from_prob(x)


def _in_base(value, base):
    if base is None:
        return value
    return value / jnp.log(jnp.asarray(base, dtype=value.dtype))


def _entropy(t: _Table):
    # "0.0 -" rather than unary minus: a certain outcome has entropy 0.0, not -0.0
    return 0.0 - jnp.sum(jnp.where(t.pos, t.prob * t.logp, 0), axis=-1)


def _cross_entropy(t: _Table, u: _Table):
    ce = 0.0 - jnp.sum(jnp.where(t.pos, t.prob * u.logp, 0), axis=-1)
    return jnp.where(jnp.any(t.pos & ~u.pos, axis=-1) & ~jnp.isnan(ce), jnp.inf, ce)


# |r| up to which ``_kl_terms`` sums the series of (1 + r) log(1 + r) - r: at 0.1 the closed form
# loses at most ~20 ulps to cancellation, and the series' 15 terms leave ~1e-17 relative.
_SERIES_MAX = 0.1


def _g_series(r):
    """``(1 + r) log(1 + r) - r = sum_{k>=2} (-r)^k / (k (k - 1))`` for ``|r| <= 0.1``."""
    acc = jnp.zeros_like(r)
    for k in range(16, 1, -1):
        acc = acc * r + (-1) ** k / (k * (k - 1))
    return acc * r * r


def _kl_terms(p, q, ell, mask, log_input):
    """Per entry ``p log(p/q) - p + q``, each ``>= 0``, where ``mask`` (``q > 0``), else 0.

    ``ell = log p - log q`` (from 0-safe logs). The terms of a KL of near-identical tables are
    ``q r^2 / 2`` (``r = p/q - 1``): ``p ell`` and ``p - q`` cancel to that, leaving only the
    rounding of ``ell`` (1e-7 absolute in float32, as large as the whole KL at r = 1e-4, which
    came out negative in half of such rows). So near ``r = 0`` the term is ``q g(r)`` by its
    series, with ``r`` from the probabilities (or ``expm1(ell)`` on the log path, where the logs
    are the data); up to ``|r| < 1`` the probability path takes ``ell = log1p(r)``, which has
    no rounding of ``log p`` and ``log q`` in it. Summed over a pair of normalised tables, the
    added ``q - p`` are 0. Where ``p = 0`` its ``p log p`` passes no gradient (the package's
    convention at zeros), so d/dp is that of ``-p``.
    """
    if log_input:
        small = mask & (p > 0) & (jnp.abs(ell) <= math.log1p(_SERIES_MAX))
        r = jnp.expm1(jnp.where(small, ell, 0))
    else:  # |p - q| < q, without dividing first (a gradient through 1/q would overflow)
        near = mask & (jnp.abs(p - q) < q)
        r = (p - q) / jnp.where(near, q, 1)
        ell = jnp.where(near, jnp.log1p(jnp.where(near, r, 0)), ell)
        small = near & (jnp.abs(r) <= _SERIES_MAX)
    series = q * _g_series(jnp.where(small, r, 0))
    closed = jnp.where(p != 0, p * ell, 0) - (p - q)
    return jnp.where(small, series, jnp.where(mask, closed, 0))


def _kl(t: _Table, u: _Table, log_input):
    """KL(p || q) as the sum of ``_kl_terms`` (the generalised KL, = KL for normalised p, q)."""
    # NaN in p stays NaN, even where q = 0 would make the result +inf.
    mask = u.pos | jnp.isnan(t.prob)
    kl = jnp.sum(_kl_terms(t.prob, u.prob, t.logp - u.logp, mask, log_input), axis=-1)
    return jnp.where(jnp.any(t.pos & ~u.pos, axis=-1) & ~jnp.isnan(kl), jnp.inf, kl)


def _jsd(t: _Table, u: _Table, log_input):
    """JSD as ``sum_k m_k f(d_k) / 2``, ``m = (p + q)/2``, ``d = (p - q)/(p + q)``,
    ``f(d) = (1 + d) log(1 + d) + (1 - d) log(1 - d) = 2 d atanh(d) + log(1 - d^2)``.

    Each term is ``>= 0`` and accurate to a few ulps however close p and q are: ``p - q`` is
    exact for close p and q, and ``f(d) ~ d^2`` has no cancellation (written as
    ``p log(p/m) + q log(q/m)``, two ``O(d)`` terms cancel to ``O(d^2)``: JSD of near-identical
    rows came out 34x too large, and a distance of 7.7e-8 as 0). For ``|d| > 1/2`` that form has
    no cancellation and is used instead (``atanh`` near 1 reads ``1 - d``, whose rounding it
    magnifies), zeros included.
    """
    both, pos = t.pos & u.pos, t.pos | u.pos
    if log_input:
        diff = jnp.where(both, t.logp - u.logp, 0)
        d = jnp.tanh(0.5 * diff)
        # log m, stable: the larger log plus log1p of the other's ratio
        top = jnp.where(both, jnp.maximum(t.logp, u.logp), jnp.where(t.pos, t.logp, u.logp))
        logm = top + jnp.where(both, jnp.log1p(jnp.exp(-jnp.abs(diff))), 0) - math.log(2)
    else:
        total = jnp.where(pos, t.prob + u.prob, 1)
        d = (t.prob - u.prob) / total
        # Not log(total / 2): half the smallest normal float is subnormal, which XLA's CPU code
        # flushes to 0, and p log(p/m) became inf for p = 2.2e-308 against q = 0 (hypothesis).
        logm = jnp.log(total) - math.log(2)
    d = jnp.where(both, d, jnp.where(t.pos, 1.0, -1.0))
    small = jnp.abs(d) <= 0.5
    d_in = jnp.where(small, d, 0)
    m = 0.5 * (t.prob + u.prob)
    near = m * (2 * d_in * jnp.arctanh(d_in) + jnp.log1p(-d_in * d_in))
    far = (jnp.where(t.pos, t.prob * (t.logp - logm), 0)
           + jnp.where(u.pos, u.prob * (u.logp - logm), 0))
    return 0.5 * jnp.sum(jnp.where(pos, jnp.where(small, near, far), 0), axis=-1)


def _joint_tables(joint, log_input):
    """The joint table, the X- and Y-marginals' safe logs and the marginals' product
    ``p(x) p(y)`` from ``joint[..., x, y]``."""
    flat = joint.reshape(joint.shape[:-2] + (-1,))
    if log_input:
        lxy = (flat - _logsumexp(flat, axis=-1)).reshape(joint.shape)
        xy = _from_log(lxy, normalized=False)
        lx = _logsumexp(lxy, axis=-1)  # (..., X, 1)
        ly = _logsumexp(lxy, axis=-2)  # (..., 1, Y)
        prod = jnp.exp(lx + ly)  # 0 where a marginal is (log 0 = -inf)
    else:
        xy = _from_prob(joint)
        px = jnp.sum(xy.prob, axis=-1, keepdims=True)
        py = jnp.sum(xy.prob, axis=-2, keepdims=True)
        lx, ly = _from_prob(px).logp, _from_prob(py).logp
        prod = px * py
    # Only used where p(x, y) > 0, where the marginals are positive too.
    safe = lambda lm: jnp.where(jnp.isfinite(lm), lm, 0)
    return xy, safe(lx), safe(ly), prod


# One compiled kernel per public call: eager calls dispatch once instead of op by op, and
# under an outer jit/vmap/grad the kernel is simply inlined.


@partial(jax.jit, static_argnames=("axis", "log_input"))
def _entropy_kernel(p, base, *, axis, log_input):
    (p,) = _as_float(p)
    p = jnp.moveaxis(p, axis, -1)
    return _in_base(_entropy(_table(p, log_input)), base)


@partial(jax.jit, static_argnames=("kind", "axes", "shape", "log_input"))
def _pair_kernel(p, q, base, *, kind, axes, shape, log_input):
    p, q = _as_float(p, q)
    p = jnp.broadcast_to(jnp.moveaxis(p, axes[0], -1), shape)
    q = jnp.broadcast_to(jnp.moveaxis(q, axes[1], -1), shape)
    t, u = _table(p, log_input), _table(q, log_input)
    if kind == "cross_entropy":
        return _in_base(_cross_entropy(t, u), base)
    if kind == "kl":
        return _in_base(_kl(t, u, log_input), base)
    jsd = _in_base(_jsd(t, u, log_input), base)
    if kind == "jsd":
        return jsd
    # js distance: sqrt with a zero (sub)gradient at p == q, where rounding may leave JSD <= 0
    pos = jsd > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, jsd, 1)), jnp.where(jnp.isnan(jsd), jsd, 0))


@partial(jax.jit, static_argnames=("kind", "log_input"))
def _joint_kernel(joint, base, *, kind, log_input):
    (joint,) = _as_float(joint)
    xy, lx, ly, q = _joint_tables(joint, log_input)
    if kind == "mi":  # KL(p(x, y) || p(x) p(y)), by _kl_terms: >= 0 for independent tables too
        ell = jnp.where(xy.pos, xy.logp - lx - ly, 0)
        # Where p(x, y) = 0 but q > 0 the term is q (p log p = 0); where q underflows to 0 with
        # p(x, y) > 0 (marginals near 1e-30 in float32), the closed form from the logs.
        terms = _kl_terms(xy.prob, q, ell, (q > 0) | xy.pos, log_input)
        return _in_base(jnp.sum(terms, axis=(-2, -1)), base)
    terms = jnp.where(xy.pos, xy.prob * (xy.logp - ly), 0)
    return _in_base(0.0 - jnp.sum(terms, axis=(-2, -1)), base)


def _pair(kind, names, p, q, axis, base, log_input, validate):
    _check_base(base)
    p, q = _array(p), _array(q)
    axes, shape = _prepare_pair(names, p, q, axis, log_input, validate)
    return _pair_kernel(p, q, base, kind=kind, axes=axes, shape=shape, log_input=bool(log_input))


def _joint(kind, joint, base, log_input, validate):
    _check_base(base)
    joint = _array(joint)
    shape = _shape(joint)
    if len(shape) < 2:
        raise ValueError(
            f"joint must have at least two dimensions joint[..., x, y], got shape {shape}."
        )
    if validate and _is_concrete(joint):
        _validate("joint", np.asarray(joint).reshape(shape[:-2] + (-1,)), log_input)
    return _joint_kernel(joint, base, kind=kind, log_input=bool(log_input))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def entropy(p, axis=-1, base=None, *, log_input=False, validate=True):
    """Shannon entropy ``H(p) = -sum_k p_k log p_k``.

    Args:
      p: ``(..., K)`` probabilities along ``axis`` (log-probabilities/logits if ``log_input``).
      axis: the event axis.
      base: ``None`` for nats, ``2`` for bits.
      log_input: treat ``p`` as log-probabilities or logits (normalised with log-softmax).
      validate: check values eagerly when concrete (default; see module docstring).

    Returns:
      ``(...)``: ``p`` with ``axis`` removed. ``0 log 0 = 0``; maximal (``log K``) for uniform.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import entropy
      >>> print(round(float(entropy(jnp.array([0.5, 0.25, 0.25, 0.0]), base=2)), 6))
      1.5

    Reference: Cover & Thomas (2006), eq. 2.1; seed eq. 10.
    """
    _check_base(base)
    p = _array(p)
    ax = _prepare_one("p", p, axis, log_input, validate)
    return _entropy_kernel(p, base, axis=ax, log_input=bool(log_input))


def cross_entropy(p, q, axis=-1, base=None, *, log_input=False, validate=True):
    """Cross entropy ``H(p, q) = -sum_k p_k log q_k = H(p) + KL(p || q)``.

    Args:
      p, q: ``(..., K)`` probabilities along ``axis``, broadcast against each other.
      axis, base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``: ``+inf`` wherever ``p > 0`` and ``q = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import cross_entropy
      >>> p, q = jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5])
      >>> print(round(float(cross_entropy(p, q, base=2)), 6))
      1.0

    Reference: Cover & Thomas (2006), ch. 5.4; seed eq. 11.
    """
    return _pair("cross_entropy", ("p", "q"), p, q, axis, base, log_input, validate)


def kl_divergence(p, q, axis=-1, base=None, *, log_input=False, validate=True):
    """Kullback-Leibler divergence ``KL(p || q) = sum_k p_k log(p_k / q_k)``.

    Args:
      p, q: ``(..., K)`` probabilities along ``axis``, broadcast against each other.
      axis, base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``, ``>= 0`` (Gibbs), ``0`` iff ``p == q``. Terms with ``p_k = 0`` are 0;
      ``p_k > 0`` with ``q_k = 0`` makes the result exactly ``+inf`` ("infinite surprise").
      Computed as ``sum_k p_k log(p_k / q_k) - p_k + q_k`` (module docstring): accurate when
      ``p`` and ``q`` are close, and for rows that do not sum to 1 this generalised KL.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import kl_divergence
      >>> print(round(float(kl_divergence(jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75]))), 6))
      0.143841
      >>> print(float(kl_divergence(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]))))
      inf

    Reference: Kullback & Leibler (1951); Cover & Thomas (2006), eq. 2.26; seed eq. 1.
    """
    return _pair("kl", ("p", "q"), p, q, axis, base, log_input, validate)


def js_divergence(p, q, axis=-1, base=None, *, log_input=False, validate=True):
    """Jensen-Shannon divergence ``JSD = KL(p || m)/2 + KL(q || m)/2``, ``m = (p + q)/2``.

    Symmetric, always finite, ``0 <= JSD <= log 2`` (1 bit). (The seed's eq. 14-15 write
    ``D(m || p)``; that is a misprint.)

    Args:
      p, q: ``(..., K)`` probabilities along ``axis``, broadcast against each other.
      axis, base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import js_divergence
      >>> p, q = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
      >>> print(round(float(js_divergence(p, q, base=2)), 6))
      1.0

    Reference: Lin (1991), eq. 4.1.
    """
    return _pair("jsd", ("p", "q"), p, q, axis, base, log_input, validate)


def js_distance(p, q, axis=-1, base=None, *, log_input=False, validate=True):
    """Jensen-Shannon distance ``sqrt(JSD(p, q))``, a metric on distributions.

    Matches ``scipy.spatial.distance.jensenshannon`` on normalized ``p`` and ``q`` (it also
    takes the square root of the divergence in the given ``base``); scipy rescales unnormalized
    inputs to sum to 1, this does not (``validate=True`` rejects them). The gradient at
    ``p == q`` is set to 0 (a subgradient).

    Args:
      p, q: ``(..., K)`` probabilities along ``axis``, broadcast against each other.
      axis, base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``, in ``[0, sqrt(log 2)]`` (``[0, 1]`` with ``base=2``).

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import js_distance
      >>> p, q = jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5])
      >>> print(round(float(js_distance(p, q, base=2)), 4))
      0.5579

    Reference: Endres & Schindelin (2003).
    """
    return _pair("jsdist", ("p", "q"), p, q, axis, base, log_input, validate)


def mutual_information(joint, base=None, *, log_input=False, validate=True):
    """Mutual information ``I(X; Y) = sum_xy p(x,y) log(p(x,y) / (p(x) p(y)))``.

    Equals ``H(X) - H(X|Y) = H(Y) - H(Y|X) >= 0``; zero iff the table is an outer product.

    Args:
      joint: ``(..., X, Y)`` joint table ``joint[..., x, y] = P(X=x, Y=y)`` (log-probabilities
        if ``log_input``, normalised over the last two axes together).
      base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``: ``KL(p(x, y) || p(x) p(y))`` as the generalised KL's non-negative terms (module
      docstring), so an unnormalised joint (with ``validate=False``) gets that, not the
      textbook sum.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import mutual_information
      >>> print(round(float(mutual_information(jnp.array([[0.5, 0.0], [0.0, 0.5]]), base=2)), 6))
      1.0

    Reference: Cover & Thomas (2006), eq. 2.28; seed eq. 13.
    """
    return _joint("mi", joint, base, log_input, validate)


def conditional_entropy(joint, base=None, *, log_input=False, validate=True):
    """Conditional entropy ``H(X|Y) = -sum_xy p(x,y) log p(x|y) = H(X,Y) - H(Y)``.

    Computed term by term from ``p(x|y) = p(x,y)/p(y)`` (every term ``>= 0``), not as a
    difference of entropies. For ``H(Y|X)`` pass ``jnp.swapaxes(joint, -1, -2)``.

    Args:
      joint: ``(..., X, Y)`` joint table ``joint[..., x, y] = P(X=x, Y=y)``.
      base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import conditional_entropy
      >>> joint = jnp.array([[0.25, 0.5], [0.25, 0.0]])  # X = row, Y = column
      >>> print(round(float(conditional_entropy(joint, base=2)), 6))  # P(y=0)=1/2, H(X|y=0)=1
      0.5

    Reference: Cover & Thomas (2006), eq. 2.10-2.14; seed eq. 12 (as corrected in SEED_NOTES).
    """
    return _joint("conditional_entropy", joint, base, log_input, validate)


def surprise(prior, posterior, axis=-1, base=None, *, log_input=False, validate=True):
    """Bayesian surprise ``KL(posterior || prior)``: how far the data moved the belief.

    ``+inf`` when the posterior puts mass where the prior put none ("infinite surprise").

    Args:
      prior, posterior: ``(..., K)`` distributions over hypotheses along ``axis``.
      axis, base, log_input, validate: as in :func:`entropy`.

    Returns:
      ``(...)``.

    Example (black swan: prior 1% on "black swans exist", one is seen):
      >>> import jax.numpy as jnp
      >>> from vi_engine.measures import surprise
      >>> prior, posterior = jnp.array([0.01, 0.99]), jnp.array([1.0, 0.0])
      >>> print(round(float(surprise(prior, posterior, base=2)), 4))
      6.6439

    Reference: Itti & Baldi (2005); seed eq. 8-9.
    """
    names = ("posterior", "prior")
    return _pair("kl", names, posterior, prior, axis, base, log_input, validate)
