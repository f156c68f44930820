"""vi_engine: a JAX-accelerated variational inference engine.

Public API, re-exported explicitly; nothing is defined here (``Flow`` and ``amortized``, which
need flax, are imported on first use).

>>> import vi_engine as vi
"""

# --- measures (information measures on probability tables) ---
from vi_engine.measures import (
    conditional_entropy,
    cross_entropy,
    entropy,
    js_distance,
    js_divergence,
    mutual_information,
)
# --- kl (KL between distributions, Monte Carlo estimates, Bayesian surprise) ---
from vi_engine.kl import (
    KLEstimate,
    KLNotImplementedError,
    kl_divergence,
    kl_estimate,
    register_kl,
    streaming_surprise,
    surprise,
)
# --- targets and exact posteriors ---
from vi_engine import exact
from vi_engine.targets import Target

# --- families, objectives, fit ---
from vi_engine.families import Family, FullRank, LowRank, MeanField, get_family, register_family
from vi_engine.fit import FitResult, StoppingRule, default_optimizer, fit, fit_many
from vi_engine.objectives import ELBO, IWAE, Estimate, Renyi, elbo, get_objective, log_weights
from vi_engine.preconditioning import Laplace, laplace

__version__ = "0.1.0"


# --- flows and amortized inference: loaded on first use (they import flax, ~0.2 s) ---
def __getattr__(name):
    import importlib

    if name == "Flow":
        return importlib.import_module("vi_engine.families.flow").Flow
    if name == "amortized":
        return importlib.import_module("vi_engine.amortized")
    raise AttributeError(f"module 'vi_engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"Flow", "amortized"})


__all__ = [
    "conditional_entropy",
    "cross_entropy",
    "entropy",
    "js_distance",
    "js_divergence",
    "mutual_information",
    "KLEstimate",
    "KLNotImplementedError",
    "kl_divergence",
    "kl_estimate",
    "register_kl",
    "streaming_surprise",
    "surprise",
    "Target",
    "exact",
    "ELBO",
    "Estimate",
    "Family",
    "FitResult",
    "FullRank",
    "IWAE",
    "LowRank",
    "MeanField",
    "Renyi",
    "StoppingRule",
    "default_optimizer",
    "elbo",
    "fit",
    "fit_many",
    "Laplace",
    "laplace",
    "get_family",
    "get_objective",
    "log_weights",
    "register_family",
    "Flow",
    "amortized",
]
