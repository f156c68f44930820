"""How hard XLA works at compiling a program: by how much the program will run.

On CPU a first fit of a small problem is almost all compilation (Bayesian linear regression,
N=500, d=20, full-rank: window compile 2.0-2.5 s with XLA's defaults, the 4,200 steps 0.1 s). So:

- ``"minimal"`` (LLVM -O0, XLA's classic elemental emitters instead of the MLIR fusion emitters)
  for programs that run once: the fit's setup and its final ELBO. That final ELBO (1000 draws)
  compiled in 0.15-0.28 s instead of 0.32-0.35 s at ``"fast"``, and ran in 10-20 ms either way.
- ``"fast"`` (LLVM -O1, classic emitters) for fit windows of cheap steps. Measured on 2 cores
  (interleaved runs, medians of 20): that window compiled in 1.0 s instead of 2.2 s, at 36
  instead of 23 us/step; mean-field and N=10^4 logistic regressions ran at the same speed either
  way, but a full-rank d=100 step was 2.4x slower (412 vs 174 us): hence a limit on XLA's own
  flop count. ``"minimal"`` compiled that window in 0.5 s but ran it 4x slower (106 us/step).
- ``"full"``: XLA's defaults.

The choice depends only on the lowered program, so a fit is reproducible. Different efforts do
not give bit-identical floats (they agree to float rounding, tested), so a program that repeats
another's steps (the NaN replay of ``vi.fit``) is compiled with the same effort.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math

import jax
import jax.numpy as jnp

try:
    from jax.extend.core import jaxprs_in_params as _jaxprs_in_params
except ImportError:  # an older JAX: XLA's count only
    _jaxprs_in_params = None

OPTIONS = {
    "minimal": {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False},
    "fast": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "full": None,
}
# (effort, up to this many flops per call as XLA counts them: a scan body once). The window of
# that linear regression is ~85k flops, the full-rank d=100 and N=10^4 logistic windows 1.0-1.4M;
# its final ELBO is 6M flops, 1.1e8 at N=10^4 (measured up to there).
WINDOW = (("fast", 250_000), ("full", math.inf))
ONCE = (("minimal", 2e8), ("fast", math.inf))


# XLA's error for an option it does not know (the cheaper ones are debug options, which come
# and go between releases): compile_lowered and jit_once then compile with XLA's defaults.
_UNKNOWN_OPTION = "No such compile option"


def compile_lowered(lowered, effort="full"):
    """Compile a ``jax.stages.Lowered`` with the compile effort ``effort``.

    ``effort``: ``"minimal"``, ``"fast"`` or ``"full"``, or tiers ``((effort, max_flops), ...)``:
    the first tier whose limit covers XLA's flop count of the program. The cheaper settings
    apply on CPU only (not measured elsewhere), and only if this XLA knows them (they are debug
    options: an XLA without them compiles with its defaults).

    >>> import jax, jax.numpy as jnp
    >>> f = compile_lowered(jax.jit(jnp.sin).lower(jnp.zeros(3)), WINDOW)
    >>> f(jnp.zeros(3)).shape
    (3,)
    """
    if jax.default_backend() != "cpu":
        return lowered.compile()
    if not isinstance(effort, str):
        effort = choose(lowered, effort)
    options = OPTIONS[effort]
    if options is not None:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as err:
            if _UNKNOWN_OPTION not in str(err):
                raise
    return lowered.compile()


def jit_once(fun=None, *, static_argnums=None):
    """``jax.jit`` for a program that runs once or a few times (drawing an exact problem, solving
    for its posterior): on CPU compiled at the ``"minimal"`` effort, elsewhere as ``jax.jit``.

    Making the six problems of ``vi_engine.exact`` (``make_*``) in a fresh process took 12.3 s
    with XLA's defaults, 4.2 s so (linear regression N=500, d=20: 3.0 s -> 0.6 s), almost all
    of it compiling. An XLA that does not know the options compiles with its defaults. Traced by
    another transformation it is plain ``jax.jit``: under ``jit`` part of the outer program
    (JAX refuses compile options on a nested jit), under a top-level ``vmap`` or ``grad``
    compiled alone with XLA's defaults.

    >>> import jax.numpy as jnp
    >>> double = jit_once(lambda x: 2 * x)
    >>> double(jnp.ones(2)).tolist()
    [2.0, 2.0]
    """
    if fun is None:
        return functools.partial(jit_once, static_argnums=static_argnums)
    plain = jax.jit(fun, static_argnums=static_argnums)
    try:
        cheap = jax.jit(fun, static_argnums=static_argnums, compiler_options=OPTIONS["minimal"])
    except TypeError:  # a JAX whose jit takes no compiler options
        return plain

    known = [True]  # whether this XLA knows the options (debug options: some do not)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        # Compile options are for a top-level jit only: JAX refuses them on a nested one.
        if known[0] and jax.default_backend() == "cpu" and not tracing((args, kwargs)):
            try:
                return cheap(*args, **kwargs)
            except jax.errors.JaxRuntimeError as err:
                if _UNKNOWN_OPTION not in str(err):
                    raise
                known[0] = False
            except ValueError as err:  # traced after all (a JAX where tracing() sees leaves only)
                if "top-level" not in str(err):
                    raise
        return plain(*args, **kwargs)

    return call


def tracing(tree) -> bool:
    """Whether a JAX transformation is tracing the caller, or ``tree`` holds tracers (the one
    test of it: ``targets._under_transformation`` is this).

    >>> import jax, jax.numpy as jnp
    >>> tracing(jnp.ones(2)), bool(jax.jit(lambda x: tracing(()) * x)(1))
    (False, True)
    """
    if any_tracer(tree):
        return True
    try:
        from jax._src.core import trace_state_clean  # no public equivalent in jax 0.10
    except ImportError:  # pragma: no cover - a later JAX: the leaves still tell
        return False
    return not trace_state_clean()


def any_tracer(tree) -> bool:
    """Whether a leaf of ``tree`` is a tracer (``tracing`` also sees a transformation of the
    caller that no leaf shows, such as a tracer held in a closure).

    >>> import jax, jax.numpy as jnp
    >>> any_tracer({"a": jnp.ones(2)}), bool(jax.jit(lambda x: any_tracer(x) * x)(1))
    (False, True)
    """
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def choose(lowered, tiers, jaxpr=None):
    """The effort of the first of ``tiers`` whose flop limit covers XLA's count of ``lowered``.

    XLA counts the flops of a lowered program only after converting it from StableHLO to HLO,
    20-50 ms per program here (a cold mean-field fit spent 0.23 s of its 1.0-1.25 s in it, a
    low-rank one 0.5 of 2.1-2.5 s), and its compilation converts it again. Given the program's
    ``jaxpr`` (a ``ClosedJaxpr``), the count is first estimated from it (``jaxpr_flops``); XLA
    is asked only when the estimate is within a factor ``_MARGIN`` of a tier's limit, or when
    the program holds an operation the estimate does not know. The estimate stays within a
    factor 1.5 of XLA's count on vi_engine's programs (tested), so the effort is the one XLA's
    count gives; except for a program without flops (only moving data), which XLA gives no
    count and the estimate 0: it gets the cheapest tier.
    """
    flops = None if jaxpr is None else jaxpr_flops(jaxpr)
    if flops is None or any(limit / _MARGIN < flops <= limit * _MARGIN
                            for _, limit in tiers if math.isfinite(limit)):
        flops = (lowered.cost_analysis() or {}).get("flops", math.inf)
    return next(effort for effort, limit in tiers if flops <= limit)


_MARGIN = 2.0

# XLA's HLO cost analysis, per element of the result (jaxlib 0.10, measured): transcendental
# functions count as transcendentals, not flops; data movement counts nothing; the operations
# JAX expands into polynomials or rounds of a cipher count those operations.
_NO_FLOPS = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "sin", "cos", "tan", "sqrt", "rsqrt",
    "cbrt", "pow", "atan2", "erf", "reshape", "broadcast_in_dim", "squeeze", "expand_dims",
    "transpose", "slice", "dynamic_slice", "dynamic_update_slice", "gather", "concatenate",
    "pad", "iota", "copy", "copy_p", "rev", "bitcast_convert_type", "random_wrap",
    "random_unwrap", "device_put", "optimization_barrier", "sharding_constraint", "split",
    "stack", "unstack", "empty", "empty2", "platform_index",
    "triangular_solve",  # (XLA counts it as -1)
})
_PER_ELEMENT = {
    **dict.fromkeys((
        "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "floor", "ceil",
        "round", "is_finite", "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "xor",
        "shift_left", "shift_right_logical", "shift_right_arithmetic", "select_n", "clamp",
        "convert_element_type", "square", "rem", "reduce_precision", "population_count",
        "stop_gradient", "add_any"), 1),
    "logistic": 3, "nextafter": 24, "lgamma": 53, "digamma": 73, "random_seed": 3,
}
# Threefry's rounds, per element (32 for 64-bit ones) of its partitionable variant, JAX's
# default; other key implementations count ~1 per element, and are left to XLA.
_THREEFRY = {"random_bits": 29, "random_split": 28, "random_fold_in": 27}
# Per element of the updates.
_PER_UPDATE = {"scatter-add": 1, "scatter_add": 1, "scatter": 0}
_PER_INPUT = {"reduce_sum": 1, "reduce_max": 1, "reduce_min": 1, "reduce_prod": 1,
              "reduce_and": 1, "reduce_or": 1, "argmax": 9, "argmin": 9}
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "while",
                    "scan", "cond"})


def jaxpr_flops(jaxpr):
    """An estimate of XLA's flop count of the program ``jaxpr`` (a ``ClosedJaxpr`` or
    ``Jaxpr``), counted as XLA's cost analysis does before optimization (a loop's body once,
    a conditional's costliest branch); ``None`` if it holds an operation it does not know.

    >>> import jax, jax.numpy as jnp
    >>> jaxpr_flops(jax.make_jaxpr(lambda a, b: (a @ b).sum())(jnp.ones((3, 4)), jnp.ones((4, 5))))
    135.0
    """
    if _jaxprs_in_params is None:
        return None
    try:
        return _flops(getattr(jaxpr, "jaxpr", jaxpr), {})
    except _Unknown:
        return None


class _Unknown(Exception):
    pass


def _size(aval):
    return math.prod(getattr(aval, "shape", ()))


def _flops(jaxpr, memo):
    if id(jaxpr) in memo:
        return memo[id(jaxpr)]
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = sum(_size(v.aval) for v in eqn.outvars)
        if name in _NO_FLOPS:
            continue
        if name in _PER_ELEMENT:
            total += _PER_ELEMENT[name] * out
        elif name in _THREEFRY:
            impl = getattr(getattr(eqn.invars[0].aval.dtype, "_impl", None), "name", None)
            if impl != "threefry2x32" or not jax.config.jax_threefry_partitionable:
                raise _Unknown(name)
            wide = eqn.params.get("bit_width", 32) == 64  # 2 words, from one more round
            total += (32 if wide else _THREEFRY[name]) * out
        elif name == "integer_pow":
            total += max(abs(eqn.params["y"]) - 1, 1) * out
        elif name in ("erf_inv", "erfc"):  # longer polynomials in float64
            f64 = eqn.outvars[0].aval.dtype.itemsize == 8
            total += {"erf_inv": (37, 100), "erfc": (62, 90)}[name][f64] * out
        elif name == "cholesky":  # (not n^3/6: XLA counts ~n^2 per matrix)
            total += out
        elif name in _PER_UPDATE:
            total += _PER_UPDATE[name] * _size(eqn.invars[-1].aval)
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[i] for i in contract)
        elif name in _PER_INPUT:
            total += _PER_INPUT[name] * _size(eqn.invars[0].aval)
        elif name in _CALLS:
            subs = [_flops(getattr(j, "jaxpr", j), memo)
                    for j in _jaxprs_in_params(eqn.params)]
            total += max(subs, default=0.0) if name == "cond" else sum(subs)
        else:
            raise _Unknown(name)
    memo[id(jaxpr)] = total
    return total


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector while JAX traces and lowers a program.

    Tracing allocates many small objects, and each allocation threshold it crosses triggers a
    collection that walks every tracked object of the process; with jax and numpyro imported a
    full (generation 2) collection takes 0.05-0.09 s here, and lowering a fit's final ELBO
    triggered one (its lowering took 0.13-0.18 s with the collector, 0.06 s without, measured).
    Tracing leaves little cyclic garbage, so nothing accumulates. Reference counting still
    frees memory, and the collector is re-enabled on exit unless it was already off.

    >>> import gc
    >>> with gc_paused():
    ...     gc.isenabled()
    False
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def after(x, dep):
    """``x``, unchanged, but computed after ``dep`` (an array of any shape):
    ``x + 0 · isnan(Σ dep)``; and in a backward pass, ``dep``'s cotangent after ``x``'s. For a
    floating ``x`` only: an integer or boolean ``x`` is returned as it is (XLA folds ``0 · y``
    for integers, so no order could be kept).

    XLA's CPU runtime runs the independent parts of a program at once, on a pool of one thread
    per core. jaxlib 0.10's batched LAPACK kernels (Cholesky, triangular solve, ...) split a
    large enough batch (2e5 flops in all) into chunks queued on that same pool and block their
    thread until the chunks are done. Two such kernels running at once on 2 cores each hold a
    thread and wait for chunks that no thread is left to run: the process hangs (jaxlib
    0.10.0-0.11.0; 0.9 has no such path and 0.11.1+ compiles it out). Measured here: 7 of 8
    mean-field fits of a 120-point Gaussian process hung in the end-of-fit check, which
    evaluated the target over two batches of draws side by side; every KL of 10^4 pairs of
    low-rank Gaussians hung (p's and q's capacitance factorizations side by side). So the
    LAPACK work that vi_engine composes is chained, each part reading the previous part's
    result: a data dependency the runtime must respect, where ``lax.optimization_barrier``
    gives no order at run time (it emits no operation, and the runtime orders by buffers).
    XLA keeps the product: ``0 · y`` is not ``0`` for a float ``y`` that may be NaN, which a
    simplifier cannot rule out. Values are unchanged (a ``-0.0`` becomes ``0.0``), and so are
    gradients.

    A chain in the forward pass is not one in the backward pass: there each factorization's
    cotangent depends only on the cotangents reaching it, and the gradient of that KL ran the
    transposes of p's and q's factorizations side by side (it hung 2 of 2 times). So the
    tangent of ``after`` is ``ẋ + 0 · Σ deṗ``: transposed, ``dep``'s cotangent reads ``x``'s, and
    whatever produced ``dep`` is differentiated after whatever consumed ``x``. (The ``0`` is a
    select on a predicate always False at run time, not a product: a NaN in ``x``'s cotangent
    stays out of ``dep``'s.) See also ``backward_after_forward``.

    >>> import jax, jax.numpy as jnp
    >>> after(jnp.array([1.0, -2.0]), jnp.array([jnp.nan, 3.0])).tolist()
    [1.0, -2.0]
    >>> after(jnp.array([True, False]), jnp.zeros(2)).dtype
    dtype('bool')
    >>> jax.grad(lambda x, d: jnp.sum(after(x, d) * d), argnums=(0, 1))(2.0, 3.0)
    (Array(3., dtype=float32, weak_type=True), Array(2., dtype=float32, weak_type=True))
    """
    if not (jnp.issubdtype(jnp.result_type(x), jnp.inexact)
            and jnp.issubdtype(jnp.result_type(dep), jnp.inexact)):
        return _after_value(x, dep)  # no tangents to order
    return _after(x, dep)


def backward_after_forward(y):
    """``y``, unchanged, with a backward pass that starts only once ``y`` is computed.

    The cotangent of a sum's gradient is a constant, so the transposes of a program's LAPACK
    calls may start while the forward pass's still run (``after``). Applied to a function's
    result, every cotangent of the function reads the result, which every forward call fed.

    >>> import jax, jax.numpy as jnp
    >>> jax.grad(lambda x: backward_after_forward(x**2))(3.0)
    Array(6., dtype=float32, weak_type=True)
    """
    return after(y, y)


def _after_value(x, dep):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        # Unordered: XLA folds an integer 0 · y to 0. Only x's dtype is kept (bool + int
        # promoted to int before).
        return jnp.asarray(x, dtype)
    flag = jnp.isnan(jnp.sum(dep)).astype(dtype)
    return x + 0 * flag


@jax.custom_jvp
def _after(x, dep):
    return _after_value(x, dep)


@_after.defjvp
def _after_jvp(primals, tangents):
    x, dep = primals
    x_dot, dep_dot = tangents
    # Linear in the tangents, so JAX transposes it: x's cotangent times (1 + 0·flag(dep)) (x's
    # backward after dep's forward value) and dep's cotangent 0·Σ(x's cotangent).
    one = 1 + 0 * jnp.isnan(jnp.sum(dep)).astype(jnp.result_type(x))
    # dep's term is a select on a predicate that is always False but that XLA cannot fold
    # (``one`` is exactly 1): its transpose still reads x's cotangent, but a select multiplies
    # nothing, so a NaN or inf in that cotangent does not turn dep's into NaN (``0 · Σ`` did:
    # one degenerate pair of a batched KL made every pair's gradient NaN, in review).
    never = one > 1
    dep_sum = jnp.sum(dep_dot)
    if jnp.iscomplexobj(dep_sum) and not jnp.iscomplexobj(x_dot):
        dep_sum = jnp.real(dep_sum)
    tangent = x_dot * one + jnp.where(never, dep_sum.astype(jnp.result_type(x)), 0)
    return _after_value(x, dep), tangent
