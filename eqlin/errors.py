"""Errors eqlin raises for bad input or a bad environment. Each message names what is wrong and how to
fix it; the CLI turns every one of them into exit code 2."""

from __future__ import annotations

from typing import Sequence


class EqlinError(ValueError):
    """Base class: bad input, an unsupported model or an unusable environment."""


class ConfigError(EqlinError):
    """config.json describes an architecture or option eqlin does not support, or holds invalid values."""


class WeightsError(EqlinError):
    """Weight or tokenizer files are missing, corrupt, or do not match the config."""


class InputError(EqlinError):
    """Arguments are unusable: text, token ids, layers, sizes, numbers out of range."""


class PrecisionError(EqlinError):
    """A dtype was asked for that JAX cannot provide in its current mode (float64 without x64)."""


class MemoryBudgetError(EqlinError):
    """A computation would need more memory than allowed; the message names a size that fits."""


class OutputError(InputError):
    """An output or cache folder cannot be written (permissions, a full disk, taken by another process)."""


class NonFiniteError(EqlinError):
    """A result holds NaN or infinity (an overflow, usually in float32); nothing was written."""


def name_list(items: Sequence[str], most: int = 8) -> str:
    """The first `most` items comma-separated, then ' …' if there are more: how messages list names."""
    return ", ".join(items[:most]) + (" …" if len(items) > most else "")
