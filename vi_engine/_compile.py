"""How hard XLA works at compiling a program: by how much the program will run.

On CPU a first fit of a small problem is almost all compilation (Bayesian linear regression,
N=500, d=20, full-rank: window compile 2.0-2.5 s with XLA's defaults, the 4,200 steps 0.1 s).
Programs that run once (the fit's setup and final ELBO) and fit windows
whose step is cheap are compiled with LLVM at -O1 and XLA's classic elemental emitters instead of
the MLIR fusion emitters.

Measured on 2 CPU cores (interleaved runs, medians of 20): that window compiled in 1.0 s instead
of 2.2 s, at 36 instead of 23 us/step; mean-field and N=10^4 logistic regressions ran at the same
speed either way, but a full-rank d=100 step was 2.4x slower (412 vs 174 us), hence the threshold
on XLA's own flop count. LLVM -O0 compiled faster still (0.5 s) but ran 4x slower (106 us/step).
The choice depends only on the lowered program, so a fit is as reproducible as before.
"""

from __future__ import annotations

import math

import jax

FAST_OPTIONS = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
# Flops per call as XLA counts them (a scan body once): the fit window of that linear regression
# is ~85k; the full-rank d=100 and N=10^4 logistic windows are 1.0M-1.4M.
FAST_MAX_FLOPS = 250_000


def compile_lowered(lowered, effort: str = "auto"):
    """Compile a ``jax.stages.Lowered``; ``effort`` is ``"fast"``, ``"full"`` or ``"auto"``.

    ``"auto"`` is fast when XLA's cost analysis counts at most ``FAST_MAX_FLOPS``. The fast
    settings apply on CPU only (not measured elsewhere), and only if this XLA knows them (they are
    debug options: an XLA without them compiles with its defaults).

    >>> import jax, jax.numpy as jnp
    >>> f = compile_lowered(jax.jit(jnp.sin).lower(jnp.zeros(3)), "fast")
    >>> f(jnp.zeros(3)).shape
    (3,)
    """
    if effort == "auto":
        flops = (lowered.cost_analysis() or {}).get("flops", math.inf)
        effort = "fast" if flops <= FAST_MAX_FLOPS else "full"
    if effort == "fast" and jax.default_backend() == "cpu":
        try:
            return lowered.compile(compiler_options=FAST_OPTIONS)
        except jax.errors.JaxRuntimeError as err:
            if "option" not in str(err):
                raise
    return lowered.compile()
