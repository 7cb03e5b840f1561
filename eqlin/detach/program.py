"""The vocabulary of `eqlin.detach`: value classes, primitive groups by how they treat their input, and
small readers of jaxpr equations (name, source line, dtype)."""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.source_info_util import summarize

from eqlin.errors import InputError

CONST, FROZEN, LINEAR, AFFINE, NONLINEAR = range(5)

# Single-operand reshapes of a value: a freeze moves up through them to the value they were made from.
STRUCTURAL = {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "convert_element_type", "copy",
              "copy_p", "slice", "reduce_precision"}
# Linear in every float operand (indices and other integer operands are read as they are).
LINEAR_OPS = STRUCTURAL | {"neg", "reduce_sum", "rev", "dynamic_slice", "gather", "cumsum", "real", "imag", "conj",
                           "split", "fft", "sharding_constraint", "mesh_cast", "reshard", "optimization_barrier",
                           "name", "psum", "all_gather", "ppermute", "all_to_all", "psum_scatter", "pbroadcast",
                           "pvary"}
# Sums (or pieces) of their float operands: a constant operand makes a linear one affine.
ADDITIVE = {"add", "sub", "add_any", "concatenate", "stack", "pad", "select_n", "dynamic_update_slice", "scatter",
            "scatter-add", "scatter_add"}
BILINEAR = {"mul", "dot_general", "conv_general_dilated"}
ZERO_DERIVATIVE = {"stop_gradient", "sign", "floor", "ceil", "round", "nextafter"}
ELEMENTWISE = {"neg", "convert_element_type", "copy", "mul", "add", "sub", "div", "integer_pow", "square", "exp",
               "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "erf", "erfc", "erf_inv",
               "rsqrt", "sqrt", "cbrt", "pow", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
               "max", "min", "abs"}
PIECEWISE = {"max", "min", "abs"}
JIT = {"pjit", "jit", "closed_call", "core_call"}
CUSTOM = {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
REMAT = {"checkpoint", "remat", "remat2"}


class DetachError(InputError):
    """`detach` met a computation it cannot split into a frozen coefficient times an affine value."""


def eqn_name(eqn) -> str:
    """The primitive's name, with the function's for jit and custom functions: `jit[silu]`."""
    name = eqn.params.get("name")
    return f"{eqn.primitive.name}[{name}]" if isinstance(name, str) else eqn.primitive.name


def source_line(eqn, outer: str = "") -> str:
    """The user's source line of an equation, "file:line (function)"; `outer`, the line of the call that
    holds it, where it has none of its own (inside a library's jit)."""
    text = summarize(eqn.source_info)
    match = re.fullmatch(r"(.*?):(\d+)(?::\d+)? \((.*)\)", text)
    return (f"{match[1]}:{match[2]} ({match[3]})" if match else text) or outer


def is_float(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def is_literal(v) -> bool:
    return isinstance(v, jcore.Literal)


def zero_literal(v) -> bool:
    return is_literal(v) and jnp.ndim(v.val) == 0 and bool(v.val == 0)


def closed_parts(j) -> tuple[Any, list]:
    """(open jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    return (j.jaxpr, list(j.consts)) if hasattr(j, "consts") else (j, [])


def custom_body(eqn):
    """The function a custom_jvp / custom_vjp call runs (`fun_jaxpr` before JAX renamed it)."""
    return eqn.params["call_jaxpr"] if "call_jaxpr" in eqn.params else eqn.params["fun_jaxpr"]


def call_body(eqn):
    """The one sub-jaxpr of a jit, checkpoint or custom-derivative call (closed or open)."""
    if eqn.primitive.name in CUSTOM:
        return custom_body(eqn)
    return eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]
