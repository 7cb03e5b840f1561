"""`detach(f)`: the exact linear (or affine) map of any JAX function at an input, found in its program.

eqlin's families freeze their nonlinear coefficients by hand (`eqlin.blocks.frozen`). `detach` finds the
same split by reading the program: it traces `f` (`jax.make_jaxpr`), classifies every value as

    constant   no dependence on the input x;
    frozen     depends on x in value only (behind a stop_gradient, a comparison, an index): no derivative;
    linear / affine in x (homogeneous, or plus a constant);
    nonlinear  anything else (exp, rsqrt, a product of two x-dependent values, ...),

and then walks back from the outputs, which must come out affine in x. An operation whose output must be
affine passes that demand on to its x-dependent operands if it is linear in them (add, reshape, a product
with a constant, ...). At a product whose operands both depend on x (`mul`, `dot_general`), one operand is
frozen (`stop_gradient`) and the other must be affine:

- the nonlinear operand, if exactly one is (RMSNorm's rsqrt(mean(x²) + eps), an activated gate
  act(gate(x)), GELU's Φ(z) in z·Φ(z), attention probabilities);
- otherwise (a tie: both affine, as x ⊙ x, or both nonlinear) the first operand, unless `prefer` names
  the site. Products of two affine values that no affine output needs (q·kᵀ) are left alone: they feed a
  nonlinearity (the softmax) whose result is frozen where it meets the linear path.

A product z·s(z) of a value and an elementwise nonlinear function of that same value (silu's z·σ(z),
GELU's z·Φ(z)) counts as nonlinear, so a gated MLP freezes the whole activated gate act(gate(x)), not
σ inside silu; where such a product itself must be affine (GPT-2's GELU(z) = z·Φ(z)), Φ(z) is frozen.
`div` freezes its denominator. `max`, `min` and `abs` (relu) freeze their selection or sign;
`integer_pow`/`square` on the linear path become x·stop_gradient(x^(n−1)). Sub-programs are followed:
jit, `lax.scan` and `while` (the carry's class is a fixed point), `cond` (every branch), `jax.checkpoint`,
and `custom_jvp`/`custom_vjp` functions, whose bodies replace them only where a freeze falls inside.

What cannot be split is refused with `DetachError` naming the primitive and the user's source line: an
output that stays nonlinear (exp, tanh, log_softmax at the output), 1/x, a primitive without a rule (an
opaque custom call, a callback), a `while` loop whose trip count depends on x.

The result g = detach(f) has f's values, and its derivative in the chosen argument is the frozen map:
J = ∂g/∂x, with f(x) = J x + c, where c is the frozen map at zero input (`constant`: the program run on a
vmapped pair (0, x) with every frozen value taken from x, as `eqlin.linear_maps.frozen_at_zero` does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from eqlin.detach.analysis import Analyzer, Plan
from eqlin.detach.evaluate import PAIR_AXIS, run
from eqlin.detach.program import CONST, LINEAR, DetachError, is_float
from eqlin.detach.sites import FrozenSite, FrozenSites
from eqlin.errors import InputError

__all__ = ["Detached", "DetachError", "FrozenSite", "FrozenSites", "detach"]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One trace of f and its plan: `closed` the jaxpr, `plan` the freezes (`eqlin.detach.analysis.Plan`),
    `out_tree` f's output structure, `output` "linear" or "affine" (a constant may be added)."""

    closed: Any
    plan: Plan
    out_tree: Any
    output: str

    def evaluate(self, args: tuple, mode: str) -> Any:
        outs = run(self.closed.jaxpr, self.closed.consts, jax.tree_util.tree_leaves(args), self.plan, mode)
        return jax.tree_util.tree_unflatten(self.out_tree, outs)


class Detached:
    """f with every nonlinear coefficient frozen (module docstring): same values, and its derivative in
    argument `argnums` is the equivalent linear map. `sites(*args)` lists what was frozen; `constant(*args)`
    is c in f(x) = J x + c."""

    def __init__(self, f: Callable, argnums: int = 0, prefer: Mapping[str, int] | None = None):
        if not isinstance(argnums, int) or isinstance(argnums, bool):
            raise InputError(f"eqlin.detach takes one argument to linearize in (an int), got argnums={argnums!r}; "
                             "pack several inputs into one pytree argument")
        bad = {k: v for k, v in (prefer or {}).items() if v not in (0, 1)}
        if bad:
            raise InputError(f"prefer maps a source line ('model.py:42') to the operand to freeze there, 0 or 1; "
                             f"got {bad}")
        self.f, self.argnums, self.prefer = f, argnums, dict(prefer or {})
        functools.update_wrapper(self, f)

    def _analyze(self, *args) -> Analysis:
        if not -len(args) <= self.argnums < len(args):
            raise InputError(f"eqlin.detach: argnums={self.argnums}, but the function was called with "
                             f"{len(args)} positional arguments")
        k = self.argnums % len(args)
        closed, shape = jax.make_jaxpr(self.f, return_shape=True)(*args)
        counts = [len(jax.tree_util.tree_leaves(a)) for a in args]
        start = sum(counts[:k])
        in_cls = [LINEAR if start <= n < start + counts[k] and is_float(v) else CONST
                  for n, v in enumerate(closed.jaxpr.invars)]
        analyzer = Analyzer(self.prefer)
        out_cls = analyzer.out_classes(closed.jaxpr, in_cls)
        plan, _ = analyzer.demand(closed.jaxpr, in_cls, [True] * len(out_cls), "")
        output = "linear" if all(c <= LINEAR for c in out_cls) else "affine"
        return Analysis(closed, plan, jax.tree_util.tree_structure(shape), output)

    def __call__(self, *args) -> Any:
        return self._analyze(*args).evaluate(args, "detach")

    def sites(self, *args) -> FrozenSites:
        """The frozen sites at these arguments (FrozenSites: a table, HTML in notebooks)."""
        analysis = self._analyze(*args)
        return FrozenSites(tuple(analysis.plan.all_sites()), analysis.output)

    def constant(self, *args) -> Any:
        """c = the frozen map at zero input, shaped like f's output: f run on the pair (0, x) vmapped, every
        frozen value taken from x (`eqlin.linear_maps.frozen_at_zero`), so f(x) = J x + c."""
        analysis = self._analyze(*args)
        k = self.argnums % len(args)
        pair = jax.tree_util.tree_map(
            lambda v: jnp.stack([jnp.zeros_like(v) if jnp.issubdtype(jnp.result_type(v), jnp.inexact) else v, v]),
            args[k])

        def member(x):
            return analysis.evaluate((*args[:k], x, *args[k + 1:]), "paired")

        return jax.tree_util.tree_map(lambda o: o[0], jax.vmap(member, axis_name=PAIR_AXIS)(pair))


def detach(f: Callable, argnums: int = 0, *, prefer: Mapping[str, int] | None = None) -> Detached:
    """f with every nonlinear coefficient frozen, found from its program (module docstring). Its values are
    f's; `jax.jacrev(detach(f))(x)` is the detached Jacobian J with f(x) = J x + c,
    c = `detach(f).constant(x)`. `prefer` maps a source line ("model.py:42", matched as a suffix of the
    site's file:line) to the operand (0 or 1) of the product there to freeze. DetachError for what cannot
    be split."""
    return Detached(f, argnums, prefer)
