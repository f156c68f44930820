"""Targets: an unnormalized log density log p̃(z) on R^dim, the thing variational inference fits.

A :class:`Target` is a registered pytree. Its data arrays (observations, hyperparameters passed
as arrays, model arguments) are leaves; the log-density function, ``dim``, ``name`` and the site
layout of a NumPyro model are static auxiliary data, hashable and equal across two constructions
with the same function and shapes. So a Target can be an argument of ``jax.jit`` (a second target
of the same shapes does not recompile) and can be built inside ``jax.vmap`` over a batch of data.

Two constructors:

- :meth:`Target.from_log_density`: a plain function ``log_density(z[, *data]) -> ()``.
- :meth:`Target.from_numpyro`: any NumPyro model with continuous latent sites, mapped to an
  unconstrained vector by numpyro's own ``biject_to`` transforms, with the log-Jacobian included
  (``log p̃(z) = -potential_energy``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer.util import constrain_fn, potential_energy

from vi_engine._compile import any_tracer as _any_tracer
from vi_engine._compile import compile_lowered, gc_paused, tracing

__all__ = ["Target", "Site"]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _under_transformation(*trees) -> bool:
    """Whether a JAX transformation is tracing the caller, or ``trees`` hold tracers: a tracer
    may also hide in a closure (a log density over a traced value), which no leaf shows."""
    return tracing(trees)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class Site(NamedTuple):
    """One latent (or deterministic) site of a NumPyro target.

    ``shape`` is the constrained value's shape; ``unconstrained_shape`` its shape after
    ``transform.inv``; ``size`` = prod(unconstrained_shape) is its slice length in ``z``
    (0 for deterministic sites); ``transform`` maps unconstrained → constrained (``None`` for
    deterministic sites). Where a site's support depends on other latent sites
    (``Uniform(-a, a)``), ``transform`` is the one at ``z = 0`` (the other sites at their image
    of zero); ``Target.constrain`` maps any ``z``.
    """

    name: str
    shape: tuple
    unconstrained_shape: tuple
    size: int
    transform: Any
    is_deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class _SiteSpec:
    name: str
    shape: tuple
    unconstrained_shape: tuple
    size: int
    is_deterministic: bool


@dataclasses.dataclass(frozen=True)
class _NumpyroSpec:
    """Static (hashable) part of a NumPyro target: model, argument structure, site layout.

    Array arguments are not here: they are the Target's leaves, slotted back into the
    ``(args, kwargs)`` structure at ``array_positions``.
    """

    model: Callable
    args_treedef: Any  # treedef of (args, kwargs)
    static_leaves: tuple  # (position, value) of the non-array leaves of (args, kwargs)
    num_leaves: int
    sites: tuple  # of _SiteSpec, model order; latent sites then deterministic sites
    observed: tuple  # names of observed sample sites

    def args_kwargs(self, arrays):
        leaves = [None] * self.num_leaves
        for pos, value in self.static_leaves:
            leaves[pos] = value
        it = iter(arrays)
        for i in range(self.num_leaves):
            if leaves[i] is None:
                leaves[i] = next(it)
        return jax.tree_util.tree_unflatten(self.args_treedef, leaves)

    @property
    def latent(self):
        return tuple(s for s in self.sites if not s.is_deterministic)

    def unravel(self, z):
        """``z: (..., dim)`` -> {site: unconstrained value (..., *unconstrained_shape)}."""
        batch = z.shape[:-1]
        out, start = {}, 0
        for s in self.latent:
            out[s.name] = z[..., start : start + s.size].reshape(batch + s.unconstrained_shape)
            start += s.size
        return out

    def __call__(self, z, *arrays):
        # A callable spec (not a bound method: those compare by identity) keeps the Target's
        # aux data equal across constructions, so jit caches.
        args, kwargs = self.args_kwargs(arrays)
        # Blocked: evaluated inside another NumPyro model (its log density as a factor, an
        # SVI trace), the model's own sites would otherwise reach the outer handlers and
        # collide with each other's names there.
        with block():
            return -potential_energy(self.model, args, kwargs, self.unravel(z))


def _split_args(args, kwargs):
    """Array leaves of (args, kwargs) become pytree leaves; the rest must be hashable static."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    arrays, static = [], []
    for i, leaf in enumerate(leaves):
        # A NumPy integer or bool scalar is a size or a flag, as a Python int is: static (a
        # model's plate size from np.int64(4) failed as a traced value, found in review), and
        # so is a 0-d NumPy array of one (np.array(4), as len-like code returns), kept a NumPy
        # scalar (hashable, and with .shape, .astype, ... for a model that uses them).
        if (isinstance(leaf, (np.generic, np.ndarray)) and leaf.ndim == 0
                and leaf.dtype.kind in "biu"):
            static.append((i, leaf.dtype.type(leaf.item())))
        elif _is_array(leaf) or _is_tracer(leaf):
            arrays.append(leaf)
        else:
            try:
                hash(leaf)
            except TypeError:
                raise TypeError(
                    f"Target.from_numpyro: model argument leaf #{i} of type {type(leaf).__name__}"
                    " is neither an array nor hashable; pass data as arrays (jnp.asarray) or"
                    " hashable Python values."
                ) from None
            static.append((i, leaf))
    return tuple(arrays), tuple(static), len(leaves), treedef


_CONVERSION_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                      jax.errors.TracerIntegerConversionError)


def _traced_value_error(model_name, err):
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"from_numpyro({model_name}): the model turns a traced value into a Python one "
        "(int(...) or len(np.unique(...)) of an array argument, an `if` on an array or on a "
        "latent value, ...). vi_engine traces array arguments, as jit does, so that one compiled "
        "fit serves any data of the same shapes, and latent values are always traced. Compute "
        "sizes outside the model and pass them as Python ints (static arguments), and use "
        f"jnp.where instead of `if` on values. JAX said: {type(err).__name__}: {first}"
    )


@jax.tree_util.register_pytree_node_class
class Target:
    """An unnormalized log density ``log p̃(z)`` over ``z ∈ R^dim``.

    Build it with :meth:`from_log_density` or :meth:`from_numpyro`; call it (or
    :meth:`log_density`) on ``z: (..., dim)`` to get ``(...)``.

    Attributes:
        dim: dimension of the unconstrained space (static).
        name: a label (static).
        data: the data leaves (a tuple of arrays / pytrees).
        sites: for NumPyro targets, the ordered :class:`Site` infos; ``()`` otherwise.
        site_names: names of ``sites``.

    >>> import jax.numpy as jnp
    >>> t = Target.from_log_density(lambda z: -0.5 * jnp.sum(z**2), dim=3)
    >>> t(jnp.zeros((5, 3))).shape
    (5,)
    """

    def __init__(self, fn, dim, data=(), name=None, spec=None):
        self._fn = fn
        self.dim = dim
        self.data = tuple(data)
        self.name = name
        self._spec = spec

    # --- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.data,), (self._fn, self.dim, self.name, self._spec)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj._fn, obj.dim, obj.name, obj._spec = aux
        obj.data = children[0]
        return obj

    def __repr__(self):
        kind = "numpyro" if self._spec is not None else "log_density"
        return f"Target(name={self.name!r}, dim={self.dim}, kind={kind})"

    # --- evaluation -------------------------------------------------------------------------
    def log_density(self, z):
        """``log p̃(z)``: ``z: (..., dim)`` -> ``(...)`` (vmapped over leading dimensions).

        >>> import jax.numpy as jnp, vi_engine as vi
        >>> t = vi.Target.from_log_density(lambda z: -0.5 * jnp.sum(z**2), 3)
        >>> t.log_density(jnp.zeros((4, 5, 3))).shape
        (4, 5)
        """
        z = jnp.asarray(z)
        if z.ndim == 0 or z.shape[-1] != self.dim:
            raise ValueError(
                f"Target {self.name!r}: z must have shape (..., {self.dim}); got shape {z.shape}."
            )
        if z.ndim == 1:
            return self._fn(z, *self.data)
        batch = z.shape[:-1]
        flat = z.reshape((-1, self.dim))
        out = jax.vmap(lambda zi: self._fn(zi, *self.data))(flat)
        return out.reshape(batch)

    __call__ = log_density

    # --- constructors -----------------------------------------------------------------------
    @classmethod
    def from_log_density(cls, log_density, dim, *, data=(), name=None):
        """A target from a function ``log_density(z) -> ()`` (or ``log_density(z, *data)``).

        Args:
            log_density: ``z: (dim,)`` [, ``*data``] -> scalar ``log p̃(z)``. Pass a module-level
                function (not a fresh lambda per call) so that two targets compare equal and a
                jitted fit does not recompile.
            dim: dimension of ``z``.
            data: tuple of arrays (or pytrees) passed after ``z``; they are the Target's pytree
                leaves, so ``jax.vmap`` over a batch of data works.
            name: a label; defaults to ``log_density.__name__``.

        Raises:
            ValueError: ``dim`` is not a positive integer, or the value at the test point
                ``z = zeros(dim)`` is not a finite scalar (checked only when concrete, so
                construction under ``jit``/``vmap`` works).

        >>> import jax, jax.numpy as jnp
        >>> def log_p(z, mu):
        ...     return -0.5 * jnp.sum((z - mu) ** 2)
        >>> t = Target.from_log_density(log_p, 2, data=(jnp.array([1.0, -1.0]),))
        >>> float(t(jnp.zeros(2)))
        -1.0
        >>> batch = jax.vmap(lambda mu: Target.from_log_density(log_p, 2, data=(mu,)))(
        ...     jnp.zeros((4, 2)))
        >>> jax.vmap(lambda t: t(jnp.ones(2)))(batch).shape
        (4,)
        """
        if not callable(log_density):
            raise TypeError(
                f"from_log_density: log_density must be callable; got {type(log_density)}."
            )
        try:
            if isinstance(dim, (bool, np.bool_)):  # an int to operator.index, not a dimension
                raise TypeError
            dim = operator.index(dim)
        except TypeError:
            raise TypeError(
                f"from_log_density: dim must be an int; got {dim!r} of type {type(dim).__name__}."
            ) from None
        if dim < 1:
            raise ValueError(f"from_log_density: dim must be >= 1; got {dim}.")
        data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        if name is None:
            name = getattr(log_density, "__name__", "target")
        target = cls(log_density, dim, data, name)
        if not _any_tracer(data):
            _check_test_point(target, what="log_density(z" + (", *data" if data else "") + ")")
        return target

    @classmethod
    def from_numpyro(cls, model, *args, **kwargs):
        """A target from a NumPyro model with continuous latent sample sites.

        The latent sites (in model order) are mapped to one unconstrained vector ``z`` by
        ``biject_to(site.fn.support)`` (numpyro's transforms, as in HMC), each site taking
        ``prod(unconstrained_shape)`` consecutive entries; ``log p̃(z)`` is the model's log
        joint at the constrained values plus ``log|det J|``, i.e.
        ``-numpyro.infer.util.potential_energy``. Array arguments of the model are pytree leaves
        (vmap over batched data works); other arguments are static and must be hashable.

        Args:
            model: a NumPyro model (Python callable).
            *args, **kwargs: passed to ``model``.

        Raises:
            ValueError: a latent site is discrete (enumeration is not supported); an observed
                value has NaN or inf entries; the model has no latent sites; the log density is
                not finite at ``z = 0``.

        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
        ...     numpyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> t = Target.from_numpyro(model, jnp.array([0.5, -0.3]))
        >>> t.dim, t.site_names
        (1, ('s',))
        >>> t.constrain(jnp.zeros((10, 1)))["s"].shape
        (10,)
        """
        arrays, static, num_leaves, treedef = _split_args(args, kwargs)
        model_name = getattr(model, "__name__", "model")
        partial_spec = _NumpyroSpec(model, treedef, static, num_leaves, (), ())
        records = []

        def inspect(*arrays):
            args, kwargs = partial_spec.args_kwargs(arrays)
            records[:] = _site_records(_trace_at_zero(model, model_name, args, kwargs), model_name)

        # Abstract evaluation: site shapes and supports without compiling or sampling anything;
        # a model with value-dependent Python control flow falls back to a concrete trace.
        try:
            try:
                jax.eval_shape(inspect, *arrays)
            except jax.errors.ConcretizationTypeError:
                inspect(*arrays)
        except _CONVERSION_ERRORS as err:
            raise _traced_value_error(model_name, err) from None
        latent, deterministic, observed = [], [], []
        for site_name, kind, shape, unc_shape in records:
            if kind == "deterministic":
                deterministic.append(_SiteSpec(site_name, shape, shape, 0, True))
            elif kind == "observed":
                observed.append(site_name)
            else:
                latent.append(_SiteSpec(site_name, shape, unc_shape, math.prod(unc_shape), False))
        if not latent:
            raise ValueError(
                f"from_numpyro({model_name}): the model has no latent sample sites "
                "(every site is observed); there is nothing to infer."
            )
        spec = _NumpyroSpec(
            model, treedef, static, num_leaves, tuple(latent + deterministic), tuple(observed)
        )
        dim = sum(s.size for s in latent)
        target = cls(spec, dim, arrays, model_name, spec)
        if not _any_tracer(arrays):
            try:
                _check_numpyro(target)
            except _CONVERSION_ERRORS as err:
                raise _traced_value_error(model_name, err) from None
        return target

    # --- NumPyro site handling ----------------------------------------------------------------
    @property
    def site_names(self) -> tuple:
        """Names of the sites (latent, then deterministic); ``()`` for non-NumPyro targets."""
        return () if self._spec is None else tuple(s.name for s in self._spec.sites)

    @property
    def sites(self) -> tuple:
        """Ordered :class:`Site` infos (latent sites in ``z`` order, then deterministic)."""
        if self._spec is None:
            return ()
        # At z = 0, not at a draw from the prior: an improper prior cannot be drawn from (a bare
        # NotImplementedError, found in review), and a support that depends on other sites
        # (Uniform(-a, a)) got bounds from a random draw of them.
        transforms = self._transforms()
        return tuple(
            Site(
                s.name,
                s.shape,
                s.unconstrained_shape,
                s.size,
                transforms.get(s.name),
                s.is_deterministic,
            )
            for s in self._spec.sites
        )

    def _require_numpyro(self, what):
        if self._spec is None:
            raise ValueError(
                f"Target {self.name!r}: {what} needs a target built with Target.from_numpyro."
            )

    def _model_args(self):
        return self._spec.args_kwargs(self.data)

    def _transforms(self, values=None):
        """Each latent site's ``biject_to(support)`` with the latent sites at ``values``
        (``None``: at their image of ``z = 0``)."""
        args, kwargs = self._model_args()
        if values is None:
            tr = _trace_at_zero(self._spec.model, self.name, args, kwargs)
        else:
            model = substitute(seed(self._spec.model, rng_seed=0), data=values)
            tr = trace(model).get_trace(*args, **kwargs)
        return {s.name: biject_to(tr[s.name]["fn"].support) for s in self._spec.latent}

    def constrain(self, z) -> dict:
        """Unconstrained ``z: (..., dim)`` -> ``{site: value (..., *site.shape)}``.

        Includes ``numpyro.deterministic`` sites, recomputed by replaying the model.

        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, vi_engine as vi
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
        ...     numpyro.deterministic("var", s**2)
        ...     numpyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> t = vi.Target.from_numpyro(model, jnp.array([0.5, -1.0]))
        >>> values = t.constrain(jnp.zeros((1000, 1)))  # z = 0 is s = exp(0) = 1
        >>> values["s"].shape, float(values["var"][0])
        ((1000,), 1.0)
        """
        self._require_numpyro("constrain")
        z = jnp.asarray(z)
        if z.ndim == 0 or z.shape[-1] != self.dim:
            raise ValueError(
                f"Target {self.name!r}: z must have shape (..., {self.dim}); got {z.shape}."
            )
        args, kwargs = self._model_args()
        return constrain_fn(
            seed(self._spec.model, rng_seed=0),
            args,
            kwargs,
            self._spec.unravel(z),
            return_deterministic=True,
            batch_ndims=z.ndim - 1,
        )

    def unconstrain(self, values: dict):
        """Constrained ``{site: value (..., *site.shape)}`` -> ``z: (..., dim)``.

        Needs every latent site; deterministic sites are ignored.

        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist, vi_engine as vi
        >>> def model(y):
        ...     s = numpyro.sample("s", dist.HalfNormal(1.0))
        ...     numpyro.sample("y", dist.Normal(0.0, s), obs=y)
        >>> t = vi.Target.from_numpyro(model, jnp.array([0.5, -1.0]))
        >>> t.unconstrain({"s": jnp.array([1.0, 2.0])}).shape  # log s, for 2 values of s
        (2, 1)
        """
        self._require_numpyro("unconstrain")
        latent = self._spec.latent
        missing = [s.name for s in latent if s.name not in values]
        if missing:
            raise ValueError(f"unconstrain: missing latent site(s) {missing}.")
        first = latent[0]
        batch_ndims = jnp.ndim(values[first.name]) - len(first.shape)
        values = {s.name: jnp.asarray(values[s.name]) for s in latent}

        def single(vals):
            transforms = self._transforms(vals)
            parts = [jnp.reshape(transforms[s.name].inv(vals[s.name]), (-1,)) for s in latent]
            return jnp.concatenate(parts)

        fn = single
        for _ in range(batch_ndims):
            fn = jax.vmap(fn)
        return fn(values)


def _site_records(tr, model_name):
    """``(name, kind, shape, unconstrained shape)`` of each site of a model trace.

    Taken inside the trace that made ``tr``: a support's bounds may be arrays of that trace
    (``Uniform(a, b)`` with array or latent ``a``, ``b``), which must not escape it.
    """
    out = []
    for name, site in tr.items():
        if site["type"] == "plate" and site["args"][1] not in (None, site["args"][0]):
            size, subsample_size = site["args"]
            raise ValueError(
                f"from_numpyro({model_name}): plate {name!r} subsamples {subsample_size} of "
                f"{size} entries (subsample_size); vi_engine fits the full-data log density, so "
                "drop subsample_size (data subsampling is not supported)."
            )
        if site["type"] == "deterministic":
            shape = tuple(jnp.shape(site["value"]))
            out.append((name, "deterministic", shape, shape))
        elif site["type"] == "sample" and site["is_observed"]:
            out.append((name, "observed", None, None))
        elif site["type"] == "sample":
            shape = tuple(jnp.shape(site["value"]))
            unc_shape = tuple(_bijection(site["fn"].support, name, model_name).inverse_shape(
                shape))
            out.append((name, "latent", shape, unc_shape))
    return out


def _bijection(support, site_name, model_name):
    """``biject_to(support)``, or an error naming the site (numpyro's is empty)."""
    try:
        return biject_to(support)
    except NotImplementedError:
        raise ValueError(
            f"from_numpyro({model_name}): latent site {site_name!r} has support {support}, "
            "which numpyro cannot map to R^k (no biject_to), so it cannot be fitted by "
            "Gaussian or flow families over an unconstrained vector. Reparameterize it, e.g. "
            "sample an unconstrained value and transform it in the model (numpyro.deterministic "
            "keeps the transformed value), or use a distribution whose support maps to R^k."
        ) from None


def _trace_at_zero(model, model_name, args, kwargs):
    """Trace ``model`` with every latent site at the image of unconstrained zeros (no sampling).

    Raises the discrete-latent-site error as soon as such a site is met.
    """

    def substitute_fn(site):
        if site["type"] != "sample" or site["is_observed"]:
            return None
        fn = site["fn"]
        if fn.support.is_discrete or getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"from_numpyro({model_name}): latent site {site['name']!r} is discrete "
                f"({type(fn).__name__}, support {fn.support}); discrete latent sites are not "
                "supported (enumeration is later work). Marginalize it out in the model."
            )
        t = _bijection(fn.support, site["name"], model_name)
        # A site's value has shape sample_shape + the distribution's (plates included in it):
        # ``numpyro.sample(..., sample_shape=(3,))`` draws 3 values (found in review: the
        # sample_shape was dropped, and such a site silently fitted one shared value).
        shape = tuple(site["kwargs"].get("sample_shape", ())) + tuple(fn.shape())
        return t(jnp.zeros(t.inverse_shape(shape)))

    model = substitute(seed(model, rng_seed=0), substitute_fn=substitute_fn)
    return trace(model).get_trace(*args, **kwargs)


@partial(jax.jit, static_argnums=0)
def _numpyro_checks(spec, z0, *arrays):
    # One compiled program per (model, shapes), cached across constructions: the log density
    # at z = 0 and the number of non-finite entries of each observed value.
    args, kwargs = spec.args_kwargs(arrays)
    tr = _trace_at_zero(spec.model, "", args, kwargs)
    bad, outside = {}, {}
    for name in spec.observed:
        v = jnp.asarray(tr[name]["value"])
        bad[name] = jnp.sum(~jnp.isfinite(v))
        # Outside the likelihood's support (a Poisson count of 2.5 or -1): the density is
        # -inf there whatever the parameters. Counted over the support's batch.
        try:
            inside = tr[name]["fn"].support(v)
        except Exception:  # a support without a check: nothing to say
            inside = True
        outside[name] = jnp.sum(~jnp.asarray(inside, bool))
    return spec(z0, *arrays), (bad, outside)


def _check_numpyro(target: Target) -> None:
    spec = target._spec
    dtype = _float_dtype(target.data)
    value, (bad, outside) = _numpyro_checks(spec, jnp.zeros((target.dim,), dtype),
                                            *target.data)
    if _is_tracer(value):
        return
    for name in spec.observed:
        count = int(bad[name])
        if not count and int(outside[name]) and not np.isfinite(np.asarray(value)):
            raise ValueError(
                f"from_numpyro({target.name}): observed site {name!r} has "
                f"{int(outside[name])} value(s) outside its distribution's support at the "
                f"test point z = zeros({target.dim}), where the log density is not finite: "
                "a non-integer or negative count for a Poisson, say, has likelihood 0 whatever "
                "the parameters. Fix the data or the likelihood (or, if the support depends on "
                "a parameter, make z = 0 a point where the data fit it)."
            )
        if count:
            raise ValueError(
                f"from_numpyro({target.name}): observed site {name!r} has {count} NaN/inf "
                "entries; drop or impute them before fitting, or give them a finite "
                "placeholder and mask their likelihood: with numpyro.handlers.mask(mask=ok): "
                "numpyro.sample(..., obs=jnp.where(ok, y, 0.0))."
            )
    _check_value(target, value, what=f"the log density of model {target.name!r}")


def _float_dtype(data):
    """The test point's dtype: the fit's (``jnp.result_type(float)``), not the data's. Under
    x64 with float32 data, numpyro's Cholesky transforms (LKJ, Wishart) build their zeros in
    the default dtype, and a float32 point then failed a dtype check that the float64 fit
    passes (found in review)."""
    del data
    return jnp.result_type(float)


def _check_test_point(target: Target, what: str) -> None:
    # numpy for the test point and the checks, jit for the density: one compilation (cached per
    # function and shapes) instead of one per eager op (~0.1 s saved on a first target).
    z0 = np.zeros((target.dim,), _float_dtype(target.data))
    args = (z0, *target.data)
    with gc_paused():
        traced = jax.jit(target._fn).trace(*args)
        if len(traced.jaxpr.jaxpr.invars) != len(jax.tree_util.tree_leaves(args)) or any(
            _is_tracer(x) for x in jax.tree_util.tree_leaves(target.data)
        ):
            return  # built under jit/vmap (traced data, or a closure over traced values): skip
        lowered = traced.lower()
    # It runs once: compiled for compile speed (0.06 instead of 0.10-0.16 s, measured).
    _check_value(target, compile_lowered(lowered, "minimal")(*args), what)


def check_batch(targets: Target, batch: int) -> None:
    """Check a batch of targets (``fit_many``'s, built under ``jax.vmap``, where
    ``_check_test_point`` is skipped): each log density must return a real floating-point
    scalar. From shapes and dtypes alone (``jax.eval_shape``): compiles and runs nothing, so
    finiteness at ``z = 0`` is left to the fit's NaN guard.

    >>> import jax, jax.numpy as jnp
    >>> make = lambda mu: Target.from_log_density(lambda z, m: -0.5 * (z - m) ** 2, 2, data=(mu,))
    >>> check_batch(jax.vmap(make)(jnp.zeros((3, 2))), 3)
    Traceback (most recent call last):
    ...
    ValueError: Target '<lambda>': log_density(z, *data) must return a scalar ...
    """
    if targets._spec is not None:
        what = f"the log density of model {targets.name!r}"
    else:
        what = "log_density(z" + (", *data" if targets.data else "") + ")"
    z0 = jnp.zeros((targets.dim,), _float_dtype(targets.data))
    # axis_size: a make_target that ignores its arguments gives a target without batched
    # leaves (B restarts of one problem, found in review)
    out = jax.eval_shape(jax.vmap(lambda t: t(z0), axis_size=batch), targets)
    _check_shape_dtype(targets, out.shape[1:], out.dtype, what, f" (problem batch of {batch})")


def _check_shape_dtype(target, shape, dtype, what, where="", value=None):
    if shape != ():
        raise ValueError(
            f"Target {target.name!r}: {what} must return a scalar for z of shape "
            f"({target.dim},); at z = zeros({target.dim}) it returned shape {shape} "
            f"(dtype {dtype}){where}. Sum over data points / dimensions inside it."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        # grad needs a real float: a complex, int or bool value failed later, inside the fit
        shown = "" if value is None else f" (value {np.asarray(value)!r})"
        raise TypeError(
            f"Target {target.name!r}: {what} must return a real floating-point scalar; at "
            f"z = zeros({target.dim}) it returned dtype {dtype}{shown}{where}. Return log p̃(z) "
            "as a float (jnp.real, .astype(float))."
        )


def _check_value(target: Target, value, what: str) -> None:
    if _is_tracer(value):  # the function closes over traced values: skip, as numpyro does
        return
    _check_shape_dtype(target, jnp.shape(value), jnp.result_type(value), what, value=value)
    if not np.isfinite(np.asarray(value)):
        raise ValueError(
            f"Target {target.name!r}: {what} is not finite at the test point "
            f"z = zeros({target.dim}): it returned {float(value)}.{_nonfinite_data(target)} "
            "A target must be finite everywhere on R^dim (map constrained parameters to R first)."
        )


def _nonfinite_data(target) -> str:
    """Where the data hold NaN/inf (the likely cause of a non-finite density), or ''."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(target.data)[0]:
        x = np.asarray(leaf)
        if x.dtype.kind in "fc" and not np.isfinite(x).all():
            count = int((~np.isfinite(x)).sum())
            found.append(f"data{jax.tree_util.keystr(path)} (shape {x.shape}) has {count} "
                         "NaN/inf entries")
    if not found:
        return ""
    return " " + "; ".join(found) + ": drop or impute them (or mask them in the density)."
