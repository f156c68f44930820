"""vi_engine: a JAX-accelerated variational inference engine.

Public API, re-exported explicitly; nothing is defined here.

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
# --- families, objectives, fit ---
from vi_engine.families.base import Family

# --- flows and amortized inference ---

__version__ = "0.1.0"

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
    "Family",
]
