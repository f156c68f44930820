"""Checks of scalar options shared by the public API: a Python or NumPy number, or a concrete
0-d array, never a bool.

Every option that configures a compiled program (``num_samples``, a family's ``rank``, a
flow's widths...) is stored as a plain Python ``int`` or ``float``, so that two fits with the
same settings share one compiled program whatever number type was passed.

>>> import numpy as np
>>> positive_int("rank", np.int64(2)), positive_number("init_scale", np.float32(0.5))
(2, 0.5)
"""

from __future__ import annotations

import math

import jax
import numpy as np


def is_real(x) -> bool:
    """A finite real number: Python or NumPy, or a concrete 0-d integer or float array (NumPy
    or JAX, as ``is_int`` takes); not a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return math.isfinite(x)
    dtype = getattr(x, "dtype", None)
    return (getattr(x, "ndim", None) == 0 and dtype is not None
            and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))
            and not isinstance(x, jax.core.Tracer) and math.isfinite(float(x)))


def is_int(x) -> bool:
    """A Python or NumPy integer, or a concrete 0-d integer array (NumPy or JAX); not a bool."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    dtype = getattr(x, "dtype", None)
    return (getattr(x, "ndim", None) == 0 and dtype is not None
            and np.issubdtype(dtype, np.integer) and not isinstance(x, jax.core.Tracer))


def layer_width(name, value) -> int:
    """A layer width: ``positive_int``, also taking a whole-number float (``32.0``, from a
    float config), but not a fractional one (``2.5`` was truncated to 2 once)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return positive_int(name, value)


def layer_widths(name, value) -> tuple[int, ...]:
    """A network's hidden widths as a tuple of ``layer_width``s; ``name`` is the option's
    (``"Flow(hidden=...)"``). A bare number is refused, not read as one layer: ``hidden=32``
    raised ``'int' object is not iterable`` (found in review)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a sequence of layer widths such as (32, 32), "
                         f"got {value!r}")
    return tuple(layer_width(f"{name} width", h) for h in value)


def positive_int(name, value, none_ok=False, minimum=1) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (Python or NumPy integer, not a bool), else a
    ValueError naming ``name``; ``None`` passes through with ``none_ok``."""
    if value is None and none_ok:
        return None
    if not (is_int(value) and value >= minimum):
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}: expected {want}{' or None' if none_ok else ''}, "
                         f"got {value!r}")
    return int(value)


def positive_number(name, value) -> float:
    """``value`` as a ``float``, finite and > 0 (Python or NumPy, not a bool), else a
    ValueError naming ``name``."""
    if not (is_real(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)
