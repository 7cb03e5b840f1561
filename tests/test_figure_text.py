"""Figure text: user strings and tokens drawn as written (no mathtext, no LaTeX), with matplotlib's per-glyph font
fallback to a font that has a character, and an escape only where no font has it. The fallback is tested with
matplotlib's own STIX font as the "installed" one, so the tests hold on any machine."""

from __future__ import annotations

import unicodedata
import warnings

import pytest
from matplotlib.text import Text

from eqlin import figure_text, report
from tests.test_report import drawn_texts

HOSTILE = ("$x$", "The sum is $$", "a\\$b $", "50% of $_{1}")  # mathtext, an empty formula, escapes, TeX specials


def test_strings_are_drawn_as_written():
    """Tick labels, a text, a title and a legend entry holding `$`: the figure renders (an empty `$$` formula
    used to end in ValueError), each shows its string as given, and none goes through mathtext or LaTeX."""
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], label=HOSTILE[1])
        ax.set_xticks([0, 1], HOSTILE[:2], **figure_text.literal(*HOSTILE[:2]))
        ax.text(0.5, 0.5, HOSTILE[2], **figure_text.literal(HOSTILE[2]))
        ax.set_title(HOSTILE[3], **figure_text.literal(HOSTILE[3]))
        figure_text.literal_legend(ax.legend())

    assert report.render_png(draw, (6, 4)).startswith(b"\x89PNG")
    fig = report.figure(draw, (6, 4))
    drawn = [text for text, _ in drawn_texts(fig)]
    assert all(drawn.count(s) == (2 if s == HOSTILE[1] else 1) for s in HOSTILE), drawn  # tick label and legend
    dollars = [t for t in fig.findobj(Text) if "$" in t.get_text()]
    assert len(dollars) >= 5 and not any(t.get_parse_math() or t.get_usetex() for t in dollars)


def _stix() -> list:
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties(family="STIXGeneral"), fallback_to_default=False)
    return [("STIXGeneral", FT2Font(path))]


def test_a_character_the_default_font_lacks_is_drawn_from_a_font_that_has_it():
    fonts = _stix()
    default, font = figure_text._default_font()
    c = next(chr(code) for code in sorted(fonts[0][1].get_charmap()) if chr(code).isprintable()
             and not unicodedata.category(chr(code)).startswith("M") and not font.get_char_index(code))
    assert figure_text.families(["a b", c], fonts) == [default, "STIXGeneral"]
    assert figure_text.families(["a b"], fonts) == [default]
    assert figure_text.drawable(f" {c}", fonts=fonts) == f"␣{c}"
    assert figure_text.drawable(c, fonts=[]) == c.encode("unicode_escape").decode()  # no font has it: an escape
    assert figure_text.drawable("\U00013000\n", fonts=fonts) == "\\U00013000\\n"  # a hieroglyph neither has

    def draw(families):
        return lambda fig: fig.text(0.5, 0.5, c, parse_math=False, fontfamily=families)

    with warnings.catch_warnings():  # matplotlib finds the glyph in the fallback font
        warnings.simplefilter("error")
        report.render_png(draw(figure_text.families([c], fonts)), (2, 1))
    with pytest.warns(UserWarning, match="missing from font"):  # and without it, draws an empty box
        report.render_png(draw([default]), (2, 1))


def test_the_caption_names_the_fonts():
    default, _ = figure_text._default_font()
    assert figure_text.font_note(["a"]) == f"fonts: {default}; \\uXXXX: a character no font here has"
