"""Errors eqlin raises for bad input. Each message names what is wrong and how to fix it."""

from __future__ import annotations


class EqlinError(ValueError):
    """Base class: bad input or an unsupported model, detected before any heavy work."""


class ConfigError(EqlinError):
    """config.json describes an architecture or option eqlin does not support."""


class WeightsError(EqlinError):
    """Weight files are missing, corrupt, or do not match the config."""


class InputError(EqlinError):
    """Text, token ids or arrays given to a model are unusable (empty, too long, out of vocabulary)."""


class PrecisionError(EqlinError):
    """A dtype was asked for that JAX cannot provide in its current mode (float64 without x64)."""


class MemoryBudgetError(EqlinError):
    """A computation would need more memory than allowed; the message names a size that fits."""
