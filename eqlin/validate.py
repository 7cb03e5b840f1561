"""`eqlin validate`: eqlin against PyTorch transformers on one checkpoint and one input, in the same process.

The checkpoint folder is loaded by transformers too (`eqlin.reference.load_transformers`; a GGUF file
through eqlin's conversion, whose weights are bit-identical to transformers' own GGUF loader), and the
one instance is compared three times, patched in memory only (never a file):

1. stock: the logits of transformers as shipped, which computes norms, RoPE and softmax in float32 even
   for a float64 model; the difference this causes is reported against a float32-level tolerance;
2. float64-faithful (`make_float64_faithful`: every op at the model's dtype): the input embeddings, every
   layer's residual stream, attention and MLP branch outputs (read off transformers' own modules with
   hooks) and the logits, each at float64-rounding tolerance;
3. detached at run time (`make_detached`): the detached Jacobian J (d, T, d) of the final hidden state
   against eqlin's `detached_jacobian`, which is also compared with a second implementation of the split:
   `eqlin.detach` applied to eqlin's plain (non-detached) forward.

Every difference is ‖eqlin − transformers‖ / ‖transformers‖ over the whole array. Needs the torch
extra (`pip install "eqlin[torch]"`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np

from eqlin.errors import EqlinError
from eqlin.model import Model

# Tolerances by dtype: float64-faithful and detached comparisons at float64 rounding grown over a deep model
# (measured at most 2.7e-15 on every family's tiny checkpoint, 5.8e-15 on the embedded Gemma 3 270M);
# stock transformers at float32 rounding (its float32 norms, RoPE and softmax: 1.5e-7 to 2.8e-7 on the tiny
# checkpoints, GPT-2 without them 7.7e-16).
TOLERANCES = {"float64": {"faithful": 1e-12, "stock": 1e-4}, "float32": {"faithful": 1e-4, "stock": 1e-4}}
PARTS = ("attn", "mlp", "residual")  # a layer's branches before the stream they add to: a wrong branch is named


@dataclasses.dataclass(frozen=True)
class Check:
    """One comparison: what (`name`; `layer` and `part` for a layer's output), its relative difference
    ‖eqlin − transformers‖ / ‖transformers‖ and the tolerance it must meet."""

    name: str
    difference: float
    tolerance: float
    layer: int | None = None
    part: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.difference <= self.tolerance)  # NaN fails


@dataclasses.dataclass(frozen=True)
class Validation:
    """Every check of one checkpoint and input, in the order they were made."""

    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        """The first check over its tolerance: a layer's before the logits and J that follow from it."""
        failed = [c for c in self.checks if not c.ok]
        in_layers = [c for c in failed if c.layer is not None]
        return (in_layers or failed or [None])[0]


def require_torch() -> None:
    """EqlinError naming the install command unless torch and transformers can be imported."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise EqlinError(f"eqlin validate compares with PyTorch transformers, and {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"eqlin[torch]\"")


def _relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    scale = np.linalg.norm(theirs)
    return float(np.linalg.norm(ours - theirs) / (scale if scale > 0 else 1.0))


def validate(model: Model, folder: Path, ids: np.ndarray) -> Validation:
    """Compare `model` (loaded by eqlin from `folder`, at its dtype) with transformers' model of the same
    folder at the same dtype, on token ids (T,): the module docstring's three stages."""
    import torch

    from eqlin import reference as ref
    from eqlin.detach import detach
    from eqlin.linear_maps import cumulative_fn, detached_jacobian, jacobian_of
    from eqlin.memory import memory_limit_bytes, resolve_chunk

    dtype = str(model.dtype)
    tol = TOLERANCES[dtype]
    theirs = ref.load_transformers(folder, dtype=getattr(torch, dtype))
    t_ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    checks = []
    with torch.no_grad():
        stock = theirs(input_ids=t_ids[None], use_cache=False).logits[0]
    logits = np.asarray(model.logits(ids))
    checks.append(Check("logits vs stock transformers (float32 norms, RoPE, softmax)", _relative(logits, stock),
                        tol["stock"]))

    ref.make_float64_faithful(theirs)
    out = model.forward(ids, collect=True)
    with torch.no_grad():
        x = ref.embed(theirs, t_ids)
        layers = ref.layer_outputs(theirs, x)
        faithful = theirs(input_ids=t_ids[None], use_cache=False).logits[0]
    checks.append(Check("input embeddings", _relative(model.embed(ids), x), tol["faithful"]))
    ours = {"attn": out.attn_outputs, "mlp": out.mlp_outputs, "residual": out.residuals}
    for layer in range(model.config.num_layers):
        for part in PARTS:
            checks.append(Check(f"layer {layer} {part}", _relative(ours[part][layer], layers[part][layer]),
                                tol["faithful"], layer, part))
    checks.append(Check("logits vs faithful transformers", _relative(out.logits, faithful), tol["faithful"]))

    ref.make_detached(theirs)
    lin = detached_jacobian(model, ids)
    checks.append(Check("detached J vs run-time-detached transformers",
                        _relative(lin.jacobian, ref.detached_jacobian(theirs, t_ids)), tol["faithful"]))
    chunk = resolve_chunk(model.config, len(ids), 1, "rev", None, model.dtype.itemsize,
                          memory_limit_bytes(params=model.params))  # the budget detached_jacobian keeps to

    @jax.jit
    def found_jacobian(params, x):  # weights as arguments: closed over, they would be compiled in as constants
        return jacobian_of(detach(cumulative_fn(params, model.config, None, "residual", False)), x, mode="rev",
                           chunk=chunk)[1]

    found = found_jacobian(model.params, model.embed(ids))
    checks.append(Check("detached J vs eqlin.detach of the plain forward", _relative(lin.jacobian, found),
                        tol["faithful"]))
    checks.append(Check("eqlin's own reconstruction error ‖y − (Σ_t J_t x_t + c)‖/‖y‖",
                        float(lin.relative_error), tol["faithful"]))
    return Validation(checks)


def table(result: Validation, dtype: str) -> str:
    """The checks as a terminal table: one row per check, a layer's three parts on one row."""
    tol = TOLERANCES[dtype]
    rows, pending = [], []  # (label, differences, status)
    for c in result.checks:
        if c.layer is None:
            rows.append((c.name, f"{c.difference:.2e}", "ok" if c.ok else "MISMATCH"))
            continue
        pending.append(c)
        if len(pending) == len(PARTS):
            bad = [r.part for r in pending if not r.ok]
            rows.append((f"layer {c.layer} ({', '.join(PARTS)})", "  ".join(f"{r.difference:.2e}" for r in pending),
                         "ok" if not bad else f"MISMATCH: {', '.join(bad)}"))
            pending = []
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"relative differences ‖eqlin − transformers‖ / ‖transformers‖; tolerances: stock {tol['stock']:.0e}, "
             f"every other check {tol['faithful']:.0e}"]
    lines += [f"  {label:<{w0}}  {values:<{w1}}  {status}" for label, values, status in rows]
    failure = result.first_failure
    if failure is None:
        lines.append(f"all {len(result.checks)} checks within tolerance")
    else:
        n = sum(not c.ok for c in result.checks)
        where = f"layer {failure.layer} ({failure.part})" if failure.layer is not None else failure.name
        lines.append(f"{n} of {len(result.checks)} checks over tolerance; the first that differs: {where}, "
                     f"{failure.difference:.2e} > {failure.tolerance:.0e}")
    return "\n".join(lines)
