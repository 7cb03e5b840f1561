"""The classification of every value of a jaxpr and the demand pass that plans the freezes (the rule:
`eqlin.detach`'s docstring and docs/detach.md)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

from eqlin.detach.program import (ADDITIVE, AFFINE, BILINEAR, CONST, CUSTOM, ELEMENTWISE, FROZEN, JIT, LINEAR,
                                  LINEAR_OPS, NONLINEAR, PIECEWISE, REMAT, STRUCTURAL, ZERO_DERIVATIVE, DetachError,
                                  call_body, closed_parts, eqn_name, is_float, is_literal, source_line, zero_literal)
from eqlin.detach.sites import FrozenSite


class Info(NamedTuple):
    """A value's class, and for elementwise chains the value they started from (`root`) and whether a
    nonlinear elementwise function lies between (`curved`): z and σ(z) share a root."""

    cls: int
    root: Any = None
    curved: bool = False


@dataclasses.dataclass
class Plan:
    """What to change in one jaxpr: operands to freeze per equation index ({operand: "freeze" | "pin"};
    a pin only matters for `constant`, where it reads the value at x), equations to rewrite, the plans of
    sub-jaxprs that change, and the sites (each with the index of the equation it is applied at)."""

    freeze: dict[int, dict[int, str]] = dataclasses.field(default_factory=dict)
    rewrite: set[int] = dataclasses.field(default_factory=set)
    inner: dict[int, tuple["Plan", ...]] = dataclasses.field(default_factory=dict)
    sites: list[tuple[int, FrozenSite]] = dataclasses.field(default_factory=list)

    def empty(self) -> bool:
        return not (self.freeze or self.rewrite or self.inner)

    def all_sites(self) -> list[FrozenSite]:
        """Every site, sub-jaxprs' included, in program order."""
        entries = [(i, [site]) for i, site in self.sites]
        entries += [(i, [site for p in plans for site in p.all_sites()]) for i, plans in self.inner.items()]
        return [site for _, group in sorted(entries, key=lambda e: e[0]) for site in group]


class Analyzer:
    """Classification and the demand pass (module docstring); `prefer` maps source-line suffixes to the
    operand (0 or 1) to freeze at products there."""

    def __init__(self, prefer: Mapping[str, int]):
        self.prefer = dict(prefer)

    # -- classification -------------------------------------------------------------------------------

    def classify(self, jaxpr, in_cls: Sequence[int]) -> dict:
        """{var: Info} for every value of an open jaxpr whose inputs have classes `in_cls`."""
        env: dict = {}
        for v in jaxpr.constvars:
            env[v] = Info(CONST)
        for v, c in zip(jaxpr.invars, in_cls):
            env[v] = Info(c, v if c >= LINEAR else None)
        for eqn in jaxpr.eqns:
            ins = [self.info(env, v) for v in eqn.invars]
            for v, info in zip(eqn.outvars, self._eqn_info(eqn, ins)):
                env[v] = info if info.cls < LINEAR or info.root is not None else info._replace(root=v)
        return env

    @staticmethod
    def info(env: dict, v) -> Info:
        return Info(CONST) if is_literal(v) else env.get(v, Info(CONST))

    def out_classes(self, jaxpr, in_cls: Sequence[int]) -> list[int]:
        env = self.classify(jaxpr, in_cls)
        return [self.info(env, v).cls for v in jaxpr.outvars]

    def _eqn_info(self, eqn, ins: list[Info]) -> list[Info]:
        """The Info of each output of one equation from its inputs' (the table in docs/detach.md)."""
        name = eqn.primitive.name
        c = [i.cls for i in ins]
        n_out = len(eqn.outvars)
        sub = self._sub_classes(eqn, c)
        if sub is not None:
            return [Info(k) for k in sub]
        if all(k <= FROZEN for k in c):
            return [Info(FROZEN if FROZEN in c else CONST)] * n_out
        if not all(is_float(v) for v in eqn.outvars) or name in ZERO_DERIVATIVE:
            return [Info(FROZEN)] * n_out
        dep = [k for k, v in zip(ins, eqn.invars) if k.cls >= LINEAR and is_float(v)]
        top = max(k.cls for k in dep)
        elementwise = name in ELEMENTWISE and all(v.aval.shape == eqn.outvars[0].aval.shape
                                                 for v, k in zip(eqn.invars, ins) if k.cls >= LINEAR)
        roots = {k.root for k in dep}
        root = dep[0].root if elementwise and len(roots) == 1 else None
        curved = any(k.curved for k in dep)
        if name in LINEAR_OPS:
            return [Info(top, root, curved)] * n_out
        if name in ADDITIVE:
            cases = eqn.invars[1:] if name == "select_n" else eqn.invars
            if name == "select_n" and ins[0].cls >= FROZEN:
                return [Info(NONLINEAR, root, True)]  # picks by x: piecewise
            constant = any(k <= FROZEN and is_float(v) and not zero_literal(v)
                           for v, k in zip(cases, c[len(eqn.invars) - len(cases):]))
            return [Info(AFFINE if constant and top == LINEAR else top, root, curved)]
        if name in BILINEAR or name == "div":
            a, b = ins[0].cls, ins[1].cls
            if name == "div" and b < LINEAR:
                return [Info(a, root, curved)]
            if name == "div" and a < LINEAR:
                return [Info(NONLINEAR, root, True)]
            if a < LINEAR or b < LINEAR:
                return [Info(top, root, curved)]
            if root is not None:  # z·s(z): an activation
                return [Info(NONLINEAR, root, True)]
            if (a == NONLINEAR) != (b == NONLINEAR):
                return [Info(min(a, b))]
            return [Info(NONLINEAR)]
        if name == "integer_pow" and eqn.params["y"] == 1:
            return [Info(top, root, curved)]
        return [Info(NONLINEAR, root, True)] * n_out

    def _sub_classes(self, eqn, c: list[int]) -> list[int] | None:
        """Output classes of an equation holding sub-jaxprs, or None for any other."""
        name, p = eqn.primitive.name, eqn.params
        if name in JIT | CUSTOM | REMAT:
            return self.out_classes(closed_parts(call_body(eqn))[0], c)
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
            return [(NONLINEAR if k >= LINEAR else FROZEN) if pred >= FROZEN else k for k in carry]
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
               ) -> tuple[Plan, list[bool]]:
        """The plan that makes every demanded output of `jaxpr` affine in x, and which inputs must be
        affine for it (DetachError where no plan exists)."""
        env = self.classify(jaxpr, in_cls)
        producer, uses = {}, {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.outvars:
                producer[v] = i
            for v in eqn.invars:
                if not is_literal(v):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if not is_literal(v):
                uses[v] = uses.get(v, 0) + 1
        demanded = {v for v, d in zip(jaxpr.outvars, out_demand)
                    if d and not is_literal(v) and self.info(env, v).cls >= LINEAR}
        state = State(jaxpr, env, producer, uses, demanded, Plan(), path, outer)
        for i in reversed(range(len(jaxpr.eqns))):
            if any(v in demanded for v in jaxpr.eqns[i].outvars):
                self._demand_eqn(state, i)
        return state.plan, [v in demanded for v in jaxpr.invars]

    def _demand_eqn(self, s: "State", i: int) -> None:
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
                    s.freeze(i, j, "pin", "discrete" if not is_float(eqn.invars[j]) else rule)

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
        where = source_line(eqn, outer)
        for suffix, k in self.prefer.items():
            if where.split(" (")[0].endswith(suffix):
                return int(k), "prefer"
        if (c[0] == NONLINEAR) != (c[1] == NONLINEAR):
            k = 0 if c[0] == NONLINEAR else 1
            a, b = (self.info(env, v) for v in eqn.invars[:2])
            same = a.root is not None and a.root == b.root
            return k, "activation" if same else "coefficient"
        return 0, "tie"

    def _demand_sub(self, s: "State", i: int, eqn, c: list[int], outs: list[bool], need) -> bool:
        """Demand through an equation holding sub-jaxprs; False for any other equation."""
        name, p = eqn.primitive.name, eqn.params
        path = f"{s.path}/{eqn_name(eqn)}" if s.path else eqn_name(eqn)
        outer = source_line(eqn, s.outer)
        if name in JIT | CUSTOM | REMAT:
            plan, ins = self.demand(closed_parts(call_body(eqn))[0], c, outs, path, outer)
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
            s.inner(i, (Plan(), plan))
            need(*[cn + j for j, d in enumerate(ins) if d])
            return True
        return False



@dataclasses.dataclass
class State:
    """The demand pass over one jaxpr: classes, producers and use counts, the demanded values, the plan."""

    jaxpr: Any
    env: dict
    producer: dict
    uses: dict
    demanded: set
    plan: Plan
    path: str
    outer: str

    def refuse(self, eqn, why: str) -> DetachError:
        inside = f" (inside {self.path})" if self.path else ""
        return DetachError(
            f"eqlin.detach cannot split `{eqn_name(eqn)}` at {source_line(eqn, self.outer)}{inside}: {why}. Return a "
            f"value that is affine given frozen coefficients (for instance before a final softcap, exp or "
            f"log_softmax), or freeze the part yourself with jax.lax.stop_gradient (docs/detach.md, 'What is "
            f"refused').")

    def freeze(self, i: int, j: int, kind: str, rule: str) -> None:
        """Freeze operand j of equation i, moved up through single-use reshapes and scalings by constants
        (RMSNorm's weight) to the value they came from; record the site."""
        eqn = self.jaxpr.eqns[i]
        consumer = eqn_name(eqn)
        v = eqn.invars[j]
        while not is_literal(v) and v in self.producer and self.uses.get(v) == 1:
            up = self.jaxpr.eqns[self.producer[v]]
            moving = [n for n, u in enumerate(up.invars) if Analyzer.info(self.env, u).cls != CONST]
            scaled = up.primitive.name == "mul" or (up.primitive.name == "div" and moving == [0])
            if len(moving) != 1 or not (up.primitive.name in STRUCTURAL or scaled):
                break
            i, j, v = self.producer[v], moving[0], up.invars[moving[0]]
        self.plan.freeze.setdefault(i, {})[j] = kind
        made = self.jaxpr.eqns[self.producer[v]] if v in self.producer else None
        site = FrozenSite(eqn_name(made) if made is not None else "input",
                          source_line(made if made is not None else eqn, self.outer), tuple(v.aval.shape), consumer,
                          rule, self.path)
        self.plan.sites.append((i, site))

    def rewrite(self, i: int, rule: str) -> None:
        eqn = self.jaxpr.eqns[i]
        self.plan.rewrite.add(i)
        site = FrozenSite(eqn_name(eqn), source_line(eqn, self.outer), tuple(eqn.outvars[0].aval.shape),
                          eqn_name(eqn), rule, self.path)
        self.plan.sites.append((i, site))

    def inner(self, i: int, plans: tuple[Plan, ...]) -> None:
        if not all(p.empty() for p in plans):
            self.plan.inner[i] = plans
