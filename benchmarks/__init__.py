"""vi_engine's benchmark suite: ``python -m benchmarks [--quick|--full|--tiny] [--only NAME]``.

Measures, side by side in one run, accuracy against exact posteriors, time to accuracy,
throughput, ``fit_many`` and KL throughput, for vi_engine and its baselines (a hand-written
``lax.scan`` + optax loop, NumPyro SVI, BlackJAX where installed, the closed-form posterior).

The library never imports this package.
"""

from __future__ import annotations

# numpyro's own KL pairs, captured before vi_engine (which registers pairs in the same
# multiple-dispatch table) is imported, so the KL case compares against numpyro's own code.
try:  # pragma: no cover - import-order bookkeeping
    from numpyro.distributions import kl as _npkl

    NUMPYRO_KL_FUNCS = dict(_npkl.kl_divergence.funcs)
except Exception:  # noqa: BLE001
    NUMPYRO_KL_FUNCS = {}
