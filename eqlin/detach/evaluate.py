"""Running a jaxpr with a plan: operands frozen (or, for the constant, read from the pair's member x), piecewise
operations and powers rewritten, sub-programs rebuilt through lax."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.extend.source_info_util import user_context

from eqlin.detach.analysis import Plan
from eqlin.detach.program import CUSTOM, JIT, REMAT, call_body, closed_parts, is_literal

PAIR_AXIS = "eqlin_detach_pair"  # the vmapped axis of (0, x) in `Detached.constant`


def frozen(v, kind: str, mode: str):
    """A frozen operand: behind stop_gradient ("freeze"); under mode "paired", member 1's value."""
    if mode == "paired":
        v = jax.lax.all_gather(v, PAIR_AXIS)[1]
    return jax.lax.stop_gradient(v) if kind == "freeze" else v


def rewritten(eqn, invals: list, mode: str) -> Any:
    """x^n as x·frozen(x^(n−1)); max/min as a select with a frozen choice; |x| as frozen(sign(x))·x."""
    name, x = eqn.primitive.name, invals[0]
    if name in ("integer_pow", "square"):
        return x * frozen(jax.lax.integer_pow(x, eqn.params.get("y", 2) - 1), "freeze", mode)
    if name == "abs":
        return x * frozen(jnp.sign(x), "pin", mode)
    a, b = invals
    aval = eqn.outvars[0].aval
    pick = frozen(a >= b if name == "max" else a <= b, "pin", mode)
    return jnp.broadcast_to(jnp.where(pick, a, b), aval.shape).astype(aval.dtype)


def run(jaxpr, consts: Sequence, args: Sequence, plan: Plan, mode: str) -> list:
    """Evaluate `jaxpr` on `args` with the plan's freezes, rewrites and rebuilt sub-programs (each value
    dropped after its last use, so an eager run holds no more than the program needs)."""
    env: dict = {}
    last = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.invars if not is_literal(v)}
    last.update({v: len(jaxpr.eqns) for v in jaxpr.outvars if not is_literal(v)})

    def read(v):
        return v.val if is_literal(v) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        for j, kind in plan.freeze.get(i, {}).items():
            invals[j] = frozen(invals[j], kind, mode)
        if i in plan.rewrite:
            outs = [rewritten(eqn, invals, mode)]
        elif i in plan.inner:
            outs = rebuilt(eqn, invals, plan.inner[i], mode)
        else:
            outs = bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
        for v in eqn.invars:
            if not is_literal(v) and last[v] == i:
                env.pop(v, None)
    return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals: list) -> list:
    """The equation as it is, on new inputs, keeping its source line (as jax.core.eval_jaxpr does)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # JAX 0.8: (subfuns, params)
    with user_context(eqn.source_info.traceback), eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def rebuilt(eqn, invals: list, plans: tuple[Plan, ...], mode: str) -> list:
    """An equation holding sub-jaxprs, run with its sub-plans: jit and custom functions inline, scan,
    cond, while and checkpoint rebuilt through lax."""
    name, p = eqn.primitive.name, eqn.params
    if name in JIT or name in CUSTOM:
        body, consts = closed_parts(call_body(eqn))
        return run(body, consts, invals, plans[0], mode)
    if name in REMAT:
        body, consts = closed_parts(p["jaxpr"])
        fn = jax.checkpoint(lambda *a: run(body, consts, a, plans[0], mode), prevent_cse=p.get("prevent_cse", True),
                            policy=p.get("policy"))
        return list(fn(*invals))
    if name == "scan":
        nc, ncar = p["num_consts"], p["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
        body = p["jaxpr"]

        def step(carry, x):
            outs = run(body.jaxpr, body.consts, [*consts, *carry, *x], plans[0], mode)
            return outs[:ncar], outs[ncar:]

        carry, ys = jax.lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
        return [*carry, *ys]
    if name == "cond":
        def branch(k, *ops):
            b = p["branches"][k]
            return run(b.jaxpr, b.consts, ops, plans[k], mode)

        return list(jax.lax.switch(invals[0], [functools.partial(branch, k) for k in range(len(plans))],
                                   *invals[1:]))
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        return list(jax.lax.while_loop(lambda carry: run(cj.jaxpr, cj.consts, [*cc, *carry], plans[0], mode)[0],
                                       lambda carry: run(bj.jaxpr, bj.consts, [*bc, *carry], plans[1], mode),
                                       list(init)))
    raise AssertionError(f"no rebuild for {name}")  # _demand_sub plans only the primitives above
