"""Variational families: mean-field, full-rank and low-rank Gaussians, normalizing flows.

``get_family`` turns a name ("meanfield", "fullrank", "lowrank", "flow") or a ``Family`` object
into a ``Family``; new families plug in by being a ``Family`` (or by adding a name here).
"""

from __future__ import annotations

from vi_engine.families.base import Family
from vi_engine.families.gaussian import FullRank, LowRank, MeanField

# name -> zero-argument constructor
_REGISTRY: dict[str, type] = {"meanfield": MeanField, "fullrank": FullRank, "lowrank": LowRank}


def register_family(name: str, cls: type) -> None:
    """Make ``vi.fit(target, name, ...)`` build ``cls()``."""
    _REGISTRY[name] = cls


def get_family(family: str | Family) -> Family:
    """A ``Family`` from a name or a ``Family`` instance.

    >>> get_family("meanfield")  # doctest: +SKIP
    MeanField(init_scale=0.1)
    """
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        try:
            return _REGISTRY[family]()
        except KeyError:
            known = ", ".join(sorted(_REGISTRY))
            raise ValueError(
                f"family: unknown name {family!r}; known families are: {known} "
                "(or pass a vi_engine Family object)"
            ) from None
    raise TypeError(
        f"family: expected a name (str) or a vi_engine Family, got {type(family).__name__}"
    )


__all__ = ["Family", "FullRank", "LowRank", "MeanField", "get_family", "register_family"]

# at the bottom: flow.py imports only families.base, so there is no import cycle
from vi_engine.families.flow import Flow as _Flow  # noqa: E402

register_family("flow", _Flow)
