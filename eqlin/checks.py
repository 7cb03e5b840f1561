"""Checks of numeric arguments: integers that are not bools, finite real numbers; an InputError (or the
error class asked for) names the argument, the allowed range and why."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from eqlin.errors import EqlinError, InputError


def check_int(name: str, value: Any, low: int | None, high: int | None, why: str, *,
              error: type[EqlinError] = InputError) -> int:
    """`value` as an int in low..high (None: unbounded on that side), else `error` saying why."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = {(True, True): f" in {low}..{high}", (True, False): f" >= {low}", (False, True): f" <= {high}",
                  (False, False): ""}[(low is not None, high is not None)]
        raise error(f"{name} must be an integer{bounds} ({why}), got {value!r}")
    return int(value)


def check_real(name: str, value: Any, why: str, *, positive: bool = False,
               error: type[EqlinError] = InputError) -> float:
    """`value` as a finite float (> 0 if `positive`), else `error` saying why. Bools are refused."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(value) or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise error(f"{name} must be {kind} ({why}), got {value!r}")
    return float(value)
