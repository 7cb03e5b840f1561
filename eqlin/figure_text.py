"""User strings and decoded tokens in matplotlib figures: shown literally, in the fonts the machine has.

Every Text that holds a user string or a token gets `literal(...)`'s properties: no mathtext (a `$` is a
dollar sign, `$x$` is not math), no LaTeX (whatever the caller's rcParams say), and a list of font families
for matplotlib's per-glyph fallback: matplotlib's default font first, then, for each character it lacks, the
first font installed on the machine that has it (e.g. Noto Sans CJK for Chinese tokens). Only a character no
font has is written as an escape (`drawable`), and `font_note` says which fonts were used. Fonts are read
once per process, and the machine's fonts only when a character needs them.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence


@functools.lru_cache(maxsize=1)
def _default_font() -> tuple[str, Any]:
    """(family, FT2Font) of matplotlib's default font (DejaVu Sans unless the caller's rcParams say otherwise)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    return font.family_name, font


@functools.lru_cache(maxsize=1)
def _machine_fonts() -> tuple[tuple[str, Any], ...]:
    """(family, FT2Font) of one regular face per font family installed on the machine, by name: the fonts
    matplotlib found outside its own folder (which holds its defaults, TeX and STIX math fonts and the Last
    Resort font, whose placeholder boxes would claim every character)."""
    import os

    import matplotlib
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    own = os.path.join(matplotlib.get_data_path(), "")
    faces: dict[str, Any] = {}
    for face in font_manager.fontManager.ttflist:
        if not face.fname.startswith(own):
            faces.setdefault(face.name, []).append(face)
    fonts = []
    for family, options in sorted(faces.items()):
        face = min(options, key=lambda f: (f.style != "normal", abs((f.weight if isinstance(f.weight, int) else 400) - 400)))
        try:
            fonts.append((family, FT2Font(face.fname)))
        except (RuntimeError, OSError):  # a font matplotlib listed but cannot open: not a fallback
            continue
    return tuple(fonts)


def _first_with(c: str, fonts: Sequence[tuple[str, Any]] | None) -> str | None:
    """The family of the first font that has character `c`: the default font, then `fonts` (default: the
    machine's fonts, read only if the default font lacks `c`); None if none has it."""
    default, font = _default_font()
    if font.get_char_index(ord(c)):
        return default
    return next((family for family, f in (_machine_fonts() if fonts is None else fonts) if f.get_char_index(ord(c))),
                None)


def families(texts: Iterable[str], fonts: Sequence[tuple[str, Any]] | None = None) -> list[str]:
    """The font families to draw `texts` with: the default font's, then for each character it lacks the first
    of `fonts` (default: the machine's fonts) that has it, each family once."""
    chosen = [_default_font()[0]]
    for c in sorted({c for text in texts for c in text if c.isprintable()}):
        family = _first_with(c, fonts)
        if family is not None and family not in chosen:
            chosen.append(family)
    return chosen


def drawable(token: str, width: int = 12, fonts: Sequence[tuple[str, Any]] | None = None) -> str:
    """A token for a figure, cut to `width` characters: spaces shown as '␣', and control characters or
    characters that no font has (see `families`) written as escapes (\\n, \\uXXXX) instead of empty boxes."""

    def char(c: str) -> str:
        if c == " ":
            return "␣"
        return c if c.isprintable() and _first_with(c, fonts) is not None else c.encode("unicode_escape").decode()

    text = "".join(map(char, token)) or "∅"
    return text if len(text) <= width else text[: width - 1] + "…"


def literal(*texts: str) -> dict[str, Any]:
    """matplotlib Text properties that show `texts` as written: no mathtext, no LaTeX, and the font families
    that have their characters (`families`)."""
    return {"parse_math": False, "usetex": False, "fontfamily": families(texts)}


def literal_legend(legend) -> None:
    """`literal` for every entry of a matplotlib Legend (its labels come from the plotted artists)."""
    for text in legend.get_texts():
        text.update(literal(text.get_text()))


def font_note(texts: Iterable[str]) -> str:
    """What a figure's tokens are drawn with, for its caption: the fonts, and what an escape means."""
    return f"fonts: {', '.join(families(texts))}; \\uXXXX: a character no font here has"
