"""Variational families: mean-field, full-rank and low-rank Gaussians, normalizing flows.

``get_family`` turns a name ("meanfield", "fullrank", "lowrank", "flow") or a ``Family`` object
into a ``Family``; new families plug in by being a ``Family`` (or by adding a name here).
"""

from __future__ import annotations

from vi_engine.families.base import Family
from vi_engine.families.gaussian import FullRank, LowRank, MeanField

# name -> zero-argument constructor, or "module:attribute" of one, imported on first use (the
# flow family needs flax, which a Gaussian-only fit does not: ~0.2 s of import time).
_REGISTRY: dict[str, type | str] = {
    "meanfield": MeanField,
    "fullrank": FullRank,
    "lowrank": LowRank,
    "flow": "vi_engine.families.flow:Flow",
}


def register_family(name: str, cls: type) -> None:
    """Make ``vi.fit(target, name, ...)`` build ``cls()``.

    >>> import dataclasses, vi_engine as vi
    >>> @dataclasses.dataclass(frozen=True)
    ... class LowRank5(vi.LowRank):
    ...     rank: int = 5
    >>> vi.register_family("lowrank5", LowRank5)
    >>> vi.get_family("lowrank5").rank
    5
    """
    _REGISTRY[name] = cls


def get_family(family: str | Family) -> Family:
    """A ``Family`` from a name or a ``Family`` instance.

    >>> get_family("meanfield")
    MeanField(init_scale=0.1)
    """
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        try:
            cls = _REGISTRY[family]
        except KeyError:
            known = ", ".join(sorted(_REGISTRY))
            raise ValueError(
                f"family: unknown name {family!r}; known families are: {known} "
                "(or pass a vi_engine Family object)"
            ) from None
        if isinstance(cls, str):
            import importlib

            module, attr = cls.split(":")
            cls = _REGISTRY[family] = getattr(importlib.import_module(module), attr)
        return cls()
    if isinstance(family, type) and issubclass(family, Family):
        raise TypeError(
            f"family: expected a name (str) or a vi_engine Family object, got the class "
            f"{family.__name__}; instantiate it: vi.{family.__name__}()"
        )
    raise TypeError(
        f"family: expected a name (str) or a vi_engine Family, got {type(family).__name__}"
    )


__all__ = ["Family", "FullRank", "LowRank", "MeanField", "get_family", "register_family"]

def __getattr__(name):
    if name == "Flow":  # vi_engine.families.Flow, without importing flax up front
        from vi_engine.families.flow import Flow

        return Flow
    raise AttributeError(f"module 'vi_engine.families' has no attribute {name!r}")
