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
import html
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.source_info_util import summarize, user_context

from eqlin.errors import InputError

PAIR_AXIS = "eqlin_detach_pair"  # the vmapped axis of (0, x) in `Detached.constant`
CONST, FROZEN, LINEAR, AFFINE, NONLINEAR = range(5)
CLASS_NAMES = ("constant", "frozen", "linear", "affine", "nonlinear")

# Single-operand reshapes of a value: a freeze moves up through them to the value they were made from.
STRUCTURAL = {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "convert_element_type", "copy",
              "copy_p", "slice", "reduce_precision"}
# Linear in every float operand (indices and other integer operands are read as they are).
LINEAR_OPS = STRUCTURAL | {"neg", "reduce_sum", "rev", "dynamic_slice", "gather", "cumsum", "real", "imag", "conj",
                           "split", "sharding_constraint", "mesh_cast", "reshard", "optimization_barrier", "name"}
# Sums of their float operands: a constant operand makes a linear one affine.
ADDITIVE = {"add", "sub", "add_any", "concatenate", "pad", "select_n", "dynamic_update_slice", "scatter-add",
            "scatter_add"}
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


@dataclasses.dataclass(frozen=True)
class FrozenSite:
    """One frozen value: the `primitive` that made it (`jit[silu]` for a jitted function), where (the
    user's source line), its `shape`, the consuming `consumer` primitive, the `rule` that chose it, and
    `path`, the sub-programs it sits in ("scan/jit[f]"; "" at the top)."""

    primitive: str
    where: str
    shape: tuple[int, ...]
    consumer: str
    rule: str
    path: str = ""


RULES = {
    "coefficient": "nonlinear operand of a product with an affine one",
    "activation": "s(z) in z·s(z)",
    "tie": "first operand of a product of two affine (or two nonlinear) values",
    "prefer": "operand named by `prefer`",
    "denominator": "denominator of a division",
    "already frozen": "a value the program already stops gradients of, read at x",
    "discrete": "an index, mask or predicate computed from x",
    "power": "x^(n−1) in x·x^(n−1)",
    "selection": "which operand max/min picks",
    "sign": "sign(x) in |x| = sign(x)·x",
}


@dataclasses.dataclass(frozen=True)
class FrozenSites(Sequence[FrozenSite]):
    """The frozen sites of a detached function at one input, in program order, and its output's class
    ("linear" or "affine"). Prints as a table; notebooks show it as HTML."""

    sites: tuple[FrozenSite, ...]
    output: str

    def __getitem__(self, i):  # type: ignore[override]
        return self.sites[i]

    def __len__(self) -> int:
        return len(self.sites)

    def _rows(self) -> list[tuple[str, ...]]:
        return [(s.path or "-", s.primitive, "×".join(map(str, s.shape)) or "scalar", s.consumer, s.rule, s.where)
                for s in self.sites]

    def __repr__(self) -> str:
        head = ("in", "frozen", "shape", "consumed by", "rule", "source")
        rows = [head, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = [f"{len(self.sites)} frozen sites; the map is {self.output} in the input"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("in", "frozen", "shape", "consumed by", "rule", "source"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        return (f"<p>{len(self.sites)} frozen sites; the map is {self.output} in the input</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


class _Info(NamedTuple):
    """A value's class, and for elementwise chains the value they started from (`root`) and whether a
    nonlinear elementwise function lies between (`curved`): z and σ(z) share a root."""

    cls: int
    root: Any = None
    curved: bool = False


@dataclasses.dataclass
class _Plan:
    """What to change in one jaxpr: operands to freeze per equation index ({operand: "freeze" | "pin"};
    a pin only matters for `constant`, where it reads the value at x), equations to rewrite, the plans of
    sub-jaxprs that change, and the sites."""

    freeze: dict[int, dict[int, str]] = dataclasses.field(default_factory=dict)
    rewrite: set[int] = dataclasses.field(default_factory=set)
    inner: dict[int, tuple["_Plan", ...]] = dataclasses.field(default_factory=dict)
    sites: list[FrozenSite] = dataclasses.field(default_factory=list)

    def empty(self) -> bool:
        return not (self.freeze or self.rewrite or self.inner)

    def all_sites(self) -> list[FrozenSite]:
        out = list(self.sites)
        for plans in self.inner.values():
            for p in plans:
                out += p.all_sites()
        return out


def _name(eqn) -> str:
    """The primitive's name, with the function's for jit and custom functions: `jit[silu]`."""
    name = eqn.params.get("name")
    return f"{eqn.primitive.name}[{name}]" if isinstance(name, str) else eqn.primitive.name


def _where(eqn, outer: str = "") -> str:
    """The user's source line of an equation, "file:line (function)"; `outer`, the line of the call that
    holds it, where it has none of its own (inside a library's jit)."""
    text = summarize(eqn.source_info)
    match = re.fullmatch(r"(.*?):(\d+)(?::\d+)? \((.*)\)", text)
    return (f"{match[1]}:{match[2]} ({match[3]})" if match else text) or outer


def _is_float(v) -> bool:
    dtype = getattr(v.aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _is_literal(v) -> bool:
    return isinstance(v, jcore.Literal)


def _zero_literal(v) -> bool:
    return _is_literal(v) and jnp.ndim(v.val) == 0 and bool(v.val == 0)


def _closed_parts(j) -> tuple[Any, list]:
    """(open jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
    return (j.jaxpr, list(j.consts)) if hasattr(j, "consts") else (j, [])


def _custom_body(eqn):
    return eqn.params.get("call_jaxpr") or eqn.params["fun_jaxpr"]


class _Analyzer:
    """Classification and the demand pass (module docstring); `prefer` maps source-line suffixes to the
    operand (0 or 1) to freeze at products there."""

    def __init__(self, prefer: Mapping[str, int]):
        self.prefer = dict(prefer)

    # -- classification -------------------------------------------------------------------------------

    def classify(self, jaxpr, in_cls: Sequence[int]) -> dict:
        env: dict = {}
        for v in jaxpr.constvars:
            env[v] = _Info(CONST)
        for v, c in zip(jaxpr.invars, in_cls):
            env[v] = _Info(c, v if c >= LINEAR else None)
        for eqn in jaxpr.eqns:
            ins = [self.info(env, v) for v in eqn.invars]
            for v, info in zip(eqn.outvars, self._eqn_info(eqn, ins)):
                env[v] = info if info.cls < LINEAR or info.root is not None else info._replace(root=v)
        return env

    @staticmethod
    def info(env: dict, v) -> _Info:
        return _Info(CONST) if _is_literal(v) else env.get(v, _Info(CONST))

    def out_classes(self, jaxpr, in_cls: Sequence[int]) -> list[int]:
        env = self.classify(jaxpr, in_cls)
        return [self.info(env, v).cls for v in jaxpr.outvars]

    def _eqn_info(self, eqn, ins: list[_Info]) -> list[_Info]:
        name = eqn.primitive.name
        c = [i.cls for i in ins]
        n_out = len(eqn.outvars)
        sub = self._sub_classes(eqn, c)
        if sub is not None:
            return [_Info(k) for k in sub]
        if all(k <= FROZEN for k in c):
            return [_Info(FROZEN if FROZEN in c else CONST)] * n_out
        if not all(_is_float(v) for v in eqn.outvars) or name in ZERO_DERIVATIVE:
            return [_Info(FROZEN)] * n_out
        dep = [k for k, v in zip(ins, eqn.invars) if k.cls >= LINEAR and _is_float(v)]
        top = max(k.cls for k in dep)
        elementwise = name in ELEMENTWISE and all(v.aval.shape == eqn.outvars[0].aval.shape
                                                 for v, k in zip(eqn.invars, ins) if k.cls >= LINEAR)
        roots = {k.root for k in dep}
        root = dep[0].root if elementwise and len(roots) == 1 else None
        curved = any(k.curved for k in dep)
        if name in LINEAR_OPS:
            return [_Info(top, root, curved)] * n_out
        if name in ADDITIVE:
            cases = eqn.invars[1:] if name == "select_n" else eqn.invars
            if name == "select_n" and ins[0].cls >= FROZEN:
                return [_Info(NONLINEAR, root, True)]  # picks by x: piecewise
            constant = any(self_cls <= FROZEN and _is_float(v) and not _zero_literal(v)
                           for v, self_cls in zip(cases, c[len(eqn.invars) - len(cases):]))
            return [_Info(AFFINE if constant and top == LINEAR else top, root, curved)]
        if name in BILINEAR or name == "div":
            a, b = ins[0].cls, ins[1].cls
            if name == "div" and b < LINEAR:
                return [_Info(a, root, curved)]
            if name == "div" and a < LINEAR:
                return [_Info(NONLINEAR, root, True)]
            if a < LINEAR or b < LINEAR:
                return [_Info(top, root, curved)]
            if root is not None:  # z·s(z): an activation
                return [_Info(NONLINEAR, root, True)]
            if (a == NONLINEAR) != (b == NONLINEAR):
                return [_Info(min(a, b))]
            return [_Info(NONLINEAR)]
        if name == "integer_pow" and eqn.params["y"] == 1:
            return [_Info(top, root, curved)]
        return [_Info(NONLINEAR, root, True)] * n_out

    def _sub_classes(self, eqn, c: list[int]) -> list[int] | None:
        """Output classes of an equation holding sub-jaxprs, or None for any other."""
        name, p = eqn.primitive.name, eqn.params
        if name in JIT:
            return self.out_classes(p.get("jaxpr") or p["call_jaxpr"], c)
        if name in CUSTOM:
            return self.out_classes(_closed_parts(_custom_body(eqn))[0], c)
        if name in REMAT:
            return self.out_classes(_closed_parts(p["jaxpr"])[0], c)
        if name == "cond":
            outs = [self.out_classes(b.jaxpr, c[1:]) for b in p["branches"]]
            joined = [max(ks) for ks in zip(*outs)]
            return [max(k, FROZEN if c[0] >= FROZEN and k < FROZEN else k) for k in joined]
        if name == "scan":
            nc, ncar = p["num_consts"], p["num_carry"]
            carry = self._carry_fixed_point(p["jaxpr"].jaxpr, c[:nc], c[nc:nc + ncar], c[nc + ncar:])
            return carry + self.out_classes(p["jaxpr"].jaxpr, c[:nc] + carry + c[nc + ncar:])[ncar:]
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = self._carry_fixed_point(p["body_jaxpr"].jaxpr, c[cn:cn + bn], c[cn + bn:], [])
            pred = self.out_classes(p["cond_jaxpr"].jaxpr, c[:cn] + carry)[0]
            return [NONLINEAR if pred >= FROZEN and k >= LINEAR else k for k in carry]
        return None

    def _carry_fixed_point(self, body, consts: list[int], carry: list[int], xs: list[int]) -> list[int]:
        """The carry's classes: joined with the body's carry outputs until nothing changes."""
        while True:
            out = self.out_classes(body, consts + carry + xs)[:len(carry)]
            new = [max(a, b) for a, b in zip(carry, out)]
            if new == carry:
                return carry
            carry = new

    # -- the demand pass ----------------------------------------------------------------------------

    def demand(self, jaxpr, in_cls: Sequence[int], out_demand: Sequence[bool], path: str, outer: str = ""
               ) -> tuple[_Plan, list[bool]]:
        """The plan that makes every demanded output of `jaxpr` affine in x, and which inputs must be
        affine for it (DetachError where no plan exists)."""
        env = self.classify(jaxpr, in_cls)
        producer, uses = {}, {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.outvars:
                producer[v] = i
            for v in eqn.invars:
                if not _is_literal(v):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not _is_literal(v):
                uses[v] = uses.get(v, 0) + 1
        demanded = {v for v, d in zip(jaxpr.outvars, out_demand)
                    if d and not _is_literal(v) and self.info(env, v).cls >= LINEAR}
        state = _State(jaxpr, env, producer, uses, demanded, _Plan(), path, outer)
        for i in reversed(range(len(jaxpr.eqns))):
            if any(v in demanded for v in jaxpr.eqns[i].outvars):
                self._demand_eqn(state, i)
        return state.plan, [v in demanded for v in jaxpr.invars]

    def _demand_eqn(self, s: "_State", i: int) -> None:
        eqn = s.jaxpr.eqns[i]
        name = eqn.primitive.name
        c = [self.info(s.env, v).cls for v in eqn.invars]
        outs = [v in s.demanded for v in eqn.outvars]

        def need(*js: int) -> None:
            for j in js:
                if c[j] >= LINEAR:
                    s.demanded.add(eqn.invars[j])

        def pin_frozen(rule: str = "already frozen") -> None:
            for j, k in enumerate(c):
                if k == FROZEN:
                    s.freeze(i, j, "pin", "discrete" if not _is_float(eqn.invars[j]) else rule)

        if self._demand_sub(s, i, eqn, c, outs, need):
            return
        if name in LINEAR_OPS or name in ADDITIVE:
            pin_frozen()
            need(*range(len(c)))
        elif name in BILINEAR:
            dep = [j for j in (0, 1) if c[j] >= LINEAR]
            pin_frozen()
            if len(dep) < 2:
                need(*dep)
                return
            k, rule = self._choose(eqn, c, s.env, s.outer)
            s.freeze(i, k, "freeze", rule)
            need(1 - k)
        elif name == "div":
            if c[0] < LINEAR and c[1] >= LINEAR:
                raise s.refuse(eqn, "the numerator does not depend on the input, so a/x (1/x) has no "
                                        "affine factor to keep")
            pin_frozen()
            if c[1] >= LINEAR:
                s.freeze(i, 1, "freeze", "denominator")
            need(0)
        elif name in ("integer_pow", "square"):
            n = eqn.params.get("y", 2)
            if n < 1:
                raise s.refuse(eqn, f"x^{n} has no affine factor to keep (1/x)")
            if n > 1:
                s.rewrite(i, "power")
            need(0)
        elif name in PIECEWISE:
            s.rewrite(i, "sign" if name == "abs" else "selection")
            need(*range(len(c)))
        else:
            raise s.refuse(eqn, "its output reaches the result without a product to freeze it in (an output "
                                    "that stays nonlinear), or eqlin.detach has no rule for it")

    def _choose(self, eqn, c: list[int], env: dict, outer: str) -> tuple[int, str]:
        """Which operand of a product of two x-dependent values to freeze, and the rule."""
        where = _where(eqn, outer)
        for suffix, k in self.prefer.items():
            if where.split(" (")[0].endswith(suffix):
                return int(k), "prefer"
        if (c[0] == NONLINEAR) != (c[1] == NONLINEAR):
            k = 0 if c[0] == NONLINEAR else 1
            a, b = (self.info(env, v) for v in eqn.invars[:2])
            same = a.root is not None and a.root == b.root
            return k, "activation" if same else "coefficient"
        return 0, "tie"

    def _demand_sub(self, s: "_State", i: int, eqn, c: list[int], outs: list[bool], need) -> bool:
        """Demand through an equation holding sub-jaxprs; False for any other equation."""
        name, p = eqn.primitive.name, eqn.params
        path = f"{s.path}/{_name(eqn)}" if s.path else _name(eqn)
        outer = _where(eqn, s.outer)
        if name in JIT | CUSTOM | REMAT:
            body = p.get("jaxpr") if name not in CUSTOM else _custom_body(eqn)
            body = body if body is not None else p["call_jaxpr"]
            plan, ins = self.demand(_closed_parts(body)[0], c, outs, path, outer)
            s.inner(i, (plan,))
            need(*[j for j, d in enumerate(ins) if d])
            return True
        if name == "scan":
            nc, ncar = p["num_consts"], p["num_carry"]
            body = p["jaxpr"].jaxpr
            carry_cls = self._carry_fixed_point(body, c[:nc], c[nc:nc + ncar], c[nc + ncar:])
            in_cls = c[:nc] + carry_cls + c[nc + ncar:]
            carry_d = outs[:ncar]
            while True:
                plan, ins = self.demand(body, in_cls, carry_d + outs[ncar:], path, outer)
                new = [a or b for a, b in zip(carry_d, ins[nc:nc + ncar])]
                if new == carry_d:
                    break
                carry_d = new
            s.inner(i, (plan,))
            need(*[j for j, d in enumerate(ins) if d])
            return True
        if name == "cond":
            results = [self.demand(b.jaxpr, c[1:], outs, f"{path}[{k}]", outer) for k, b in enumerate(p["branches"])]
            s.inner(i, tuple(r[0] for r in results))
            if c[0] == FROZEN:
                s.freeze(i, 0, "pin", "discrete")
            need(*[j + 1 for j in range(len(c) - 1) if any(r[1][j] for r in results)])
            return True
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            body = p["body_jaxpr"].jaxpr
            carry_cls = self._carry_fixed_point(body, c[cn:cn + bn], c[cn + bn:], [])
            if self.out_classes(p["cond_jaxpr"].jaxpr, c[:cn] + carry_cls)[0] >= FROZEN:
                raise s.refuse(eqn, "its trip count depends on the input")
            carry_d = outs
            while True:
                plan, ins = self.demand(body, c[cn:cn + bn] + carry_cls, carry_d, path, outer)
                new = [a or b for a, b in zip(carry_d, ins[bn:])]
                if new == carry_d:
                    break
                carry_d = new
            s.inner(i, (_Plan(), plan))
            need(*[cn + j for j, d in enumerate(ins) if d])
            return True
        return False



@dataclasses.dataclass
class _State:
    """The demand pass over one jaxpr: classes, producers and use counts, the demanded values, the plan."""

    jaxpr: Any
    env: dict
    producer: dict
    uses: dict
    demanded: set
    plan: _Plan
    path: str
    outer: str

    def refuse(self, eqn, why: str) -> DetachError:
        inside = f" (inside {self.path})" if self.path else ""
        return DetachError(
            f"eqlin.detach cannot split `{_name(eqn)}` at {_where(eqn, self.outer)}{inside}: {why}. Return a value "
            f"that is affine given frozen coefficients (for instance before a final softcap, exp or log_softmax), "
            f"or freeze the part yourself with jax.lax.stop_gradient (docs/detach.md, 'What is refused').")

    def freeze(self, i: int, j: int, kind: str, rule: str) -> None:
        """Freeze operand j of equation i, moved up through single-use reshapes and scalings by constants
        (RMSNorm's weight) to the value they came from; record the site."""
        eqn = self.jaxpr.eqns[i]
        consumer = _name(eqn)
        v = eqn.invars[j]
        while not _is_literal(v) and v in self.producer and self.uses.get(v) == 1:
            up = self.jaxpr.eqns[self.producer[v]]
            moving = [n for n, u in enumerate(up.invars) if _Analyzer.info(self.env, u).cls != CONST]
            scaled = up.primitive.name == "mul" or (up.primitive.name == "div" and moving == [0])
            if len(moving) != 1 or not (up.primitive.name in STRUCTURAL or scaled):
                break
            i, j, v = self.producer[v], moving[0], up.invars[moving[0]]
        self.plan.freeze.setdefault(i, {})[j] = kind
        made = self.jaxpr.eqns[self.producer[v]] if v in self.producer else None
        self.plan.sites.append(FrozenSite(_name(made) if made is not None else "input",
                                          _where(made if made is not None else eqn, self.outer), tuple(v.aval.shape),
                                          consumer, rule, self.path))

    def rewrite(self, i: int, rule: str) -> None:
        eqn = self.jaxpr.eqns[i]
        self.plan.rewrite.add(i)
        self.plan.sites.append(FrozenSite(_name(eqn), _where(eqn, self.outer), tuple(eqn.outvars[0].aval.shape),
                                          _name(eqn), rule, self.path))

    def inner(self, i: int, plans: tuple[_Plan, ...]) -> None:
        if not all(p.empty() for p in plans):
            self.plan.inner[i] = plans


# -- evaluation with the plan ---------------------------------------------------------------------------


def _frozen(v, kind: str, mode: str):
    """A frozen operand: behind stop_gradient ("freeze"); under mode "paired", member 1's value."""
    if mode == "paired":
        v = jax.lax.all_gather(v, PAIR_AXIS)[1]
    return jax.lax.stop_gradient(v) if kind == "freeze" else v


def _rewritten(eqn, invals: list, mode: str) -> Any:
    """x^n as x·frozen(x^(n−1)); max/min as a select with a frozen choice; |x| as frozen(sign(x))·x."""
    name, x = eqn.primitive.name, invals[0]
    if name in ("integer_pow", "square"):
        return x * _frozen(jax.lax.integer_pow(x, eqn.params.get("y", 2) - 1), "freeze", mode)
    if name == "abs":
        return x * _frozen(jnp.sign(x), "pin", mode)
    a, b = invals
    aval = eqn.outvars[0].aval
    pick = _frozen(a >= b if name == "max" else a <= b, "pin", mode)
    return jnp.broadcast_to(jnp.where(pick, a, b), aval.shape).astype(aval.dtype)


def _run(jaxpr, consts: Sequence, args: Sequence, plan: _Plan, mode: str) -> list:
    """Evaluate `jaxpr` on `args` with the plan's freezes, rewrites and rebuilt sub-programs."""
    env: dict = {}

    def read(v):
        return v.val if _is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        for j, kind in plan.freeze.get(i, {}).items():
            invals[j] = _frozen(invals[j], kind, mode)
        if i in plan.rewrite:
            outs = [_rewritten(eqn, invals, mode)]
        elif i in plan.inner:
            outs = _rebuilt(eqn, invals, plan.inner[i], mode)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals: list) -> list:
    """The equation as it is, on new inputs, keeping its source line (as jax.core.eval_jaxpr does)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # JAX 0.8: (subfuns, params)
    with user_context(eqn.source_info.traceback), eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _rebuilt(eqn, invals: list, plans: tuple[_Plan, ...], mode: str) -> list:
    """An equation holding sub-jaxprs, run with its sub-plans: jit and custom functions inline, scan,
    cond, while and checkpoint rebuilt through lax."""
    name, p = eqn.primitive.name, eqn.params
    if name in JIT or name in CUSTOM:
        body, consts = _closed_parts(_custom_body(eqn) if name in CUSTOM else (p.get("jaxpr") or p["call_jaxpr"]))
        return _run(body, consts, invals, plans[0], mode)
    if name in REMAT:
        body, consts = _closed_parts(p["jaxpr"])
        fn = jax.checkpoint(lambda *a: _run(body, consts, a, plans[0], mode), prevent_cse=p.get("prevent_cse", True),
                            policy=p.get("policy"))
        return list(fn(*invals))
    if name == "scan":
        nc, ncar = p["num_consts"], p["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
        body = p["jaxpr"]

        def step(carry, x):
            outs = _run(body.jaxpr, body.consts, [*consts, *carry, *x], plans[0], mode)
            return outs[:ncar], outs[ncar:]

        carry, ys = jax.lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
        return [*carry, *ys]
    if name == "cond":
        def branch(k, *ops):
            b = p["branches"][k]
            return _run(b.jaxpr, b.consts, ops, plans[k], mode)

        return list(jax.lax.switch(invals[0], [functools.partial(branch, k) for k in range(len(plans))],
                                   *invals[1:]))
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        return list(jax.lax.while_loop(lambda carry: _run(cj.jaxpr, cj.consts, [*cc, *carry], plans[0], mode)[0],
                                       lambda carry: _run(bj.jaxpr, bj.consts, [*bc, *carry], plans[1], mode),
                                       list(init)))
    raise AssertionError(f"no rebuild for {name}")  # _demand_sub plans only the primitives above


# -- the public function -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Analysis:
    closed: Any
    plan: _Plan
    out_tree: Any
    output: str

    def evaluate(self, args: tuple, mode: str) -> Any:
        outs = _run(self.closed.jaxpr, self.closed.consts, jax.tree_util.tree_leaves(args), self.plan, mode)
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

    def analyze(self, *args) -> _Analysis:
        if not -len(args) <= self.argnums < len(args):
            raise InputError(f"eqlin.detach: argnums={self.argnums}, but the function was called with "
                             f"{len(args)} positional arguments")
        k = self.argnums % len(args)
        closed, shape = jax.make_jaxpr(self.f, return_shape=True)(*args)
        counts = [len(jax.tree_util.tree_leaves(a)) for a in args]
        start = sum(counts[:k])
        in_cls = [LINEAR if start <= n < start + counts[k] and _is_float(v) else CONST
                  for n, v in enumerate(closed.jaxpr.invars)]
        analyzer = _Analyzer(self.prefer)
        out_cls = analyzer.out_classes(closed.jaxpr, in_cls)
        plan, _ = analyzer.demand(closed.jaxpr, in_cls, [True] * len(out_cls), "")
        output = "affine" if AFFINE in out_cls else "linear"
        return _Analysis(closed, plan, jax.tree_util.tree_structure(shape), output)

    def __call__(self, *args) -> Any:
        return self.analyze(*args).evaluate(args, "detach")

    def sites(self, *args) -> FrozenSites:
        """The frozen sites at these arguments (FrozenSites: a table, HTML in notebooks)."""
        analysis = self.analyze(*args)
        return FrozenSites(tuple(analysis.plan.all_sites()), analysis.output)

    def constant(self, *args) -> Any:
        """c = the frozen map at zero input, shaped like f's output: f run on the pair (0, x) vmapped, every
        frozen value taken from x (`eqlin.linear_maps.frozen_at_zero`), so f(x) = J x + c."""
        analysis = self.analyze(*args)
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
