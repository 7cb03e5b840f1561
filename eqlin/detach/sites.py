"""What `eqlin.detach` froze: one `FrozenSite` per frozen value, `FrozenSites` to read them (a table, HTML in
notebooks)."""

from __future__ import annotations

import dataclasses
import html
from typing import Sequence


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
        return "\n".join(lines + [f"  {rule}: {RULES[rule]}" for rule in self._rules()])

    def _rules(self) -> list[str]:
        """The rules used, in RULES' order (the legend under the table)."""
        used = {s.rule for s in self.sites}
        return [rule for rule in RULES if rule in used]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("in", "frozen", "shape", "consumed by", "rule", "source"))
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        legend = "".join(f"<li>{rule}: {html.escape(RULES[rule])}</li>" for rule in self._rules())
        return (f"<p>{len(self.sites)} frozen sites; the map is {self.output} in the input</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ul>{legend}</ul>")
