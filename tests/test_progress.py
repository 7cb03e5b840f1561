"""Progress on stderr, one mechanism for the CLI and the library: an explicit `quiet` decides; left at None,
EQLIN_PROGRESS (1/0) does; without it, progress shows only on a terminal or in a notebook, so logs stay clean."""

from __future__ import annotations

import io
import sys
import types

import pytest

from eqlin.errors import InputError
from eqlin.layer_story import layer_spectra
from eqlin.progress import ENV, shown, stage
from eqlin.spectral import top_singular
from tests.conftest import TEXT


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_who_decides(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert (shown(None), shown(False), shown(True)) == (False, True, False)  # a pipe or a log: nothing by default
    monkeypatch.setenv(ENV, "1")
    assert (shown(None), shown(True)) == (True, False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv(ENV, "0")
    assert (shown(None), shown(False)) == (False, True)
    monkeypatch.delenv(ENV)
    assert shown(None)  # a terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    kernel = types.SimpleNamespace(config={"IPKernelApp": {"connection_file": "kernel.json"}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert shown(None)  # a Jupyter kernel, whose stderr is no tty
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not shown(None)  # IPython imported, but no kernel


@pytest.mark.parametrize("setting", ["yes", "2", "on"])
def test_a_bad_setting_names_the_fix(monkeypatch, setting):
    monkeypatch.setenv(ENV, setting)
    with pytest.raises(InputError, match=f"{ENV}='{setting}' must be 1 \\(show progress on stderr\\) or 0 \\(none\\); "
                                         "unset it to show progress only on a terminal or in a notebook"):
        with stage("never shown"):
            pass


def test_the_layer_story_shows_progress_only_where_watched(loaded, monkeypatch, capsys):
    """The README's long library call, both ways: a bar on a terminal's stderr, nothing on a captured one, and
    EQLIN_PROGRESS=1 turning it on there."""
    model = loaded("llama_mha")
    capsys.readouterr()  # the fixture's own output (writing the checkpoint)
    monkeypatch.delenv(ENV, raising=False)
    layer_spectra(model, TEXT, layers=[0], scopes=("single",), k=2, top=2)
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    layer_spectra(model, TEXT, layers=[0], scopes=("single",), k=2, top=2)
    assert "eqlin: single-layer maps: 1/1" in terminal.getvalue()
    monkeypatch.undo()
    monkeypatch.setenv(ENV, "1")
    layer_spectra(model, TEXT, layers=[0], scopes=("single",), k=2, top=2)
    assert "eqlin: single-layer maps: 1/1" in capsys.readouterr().err


def test_matrix_free_top_k_counts_its_products(loaded, monkeypatch):
    """A bar counting the products with J and Jᵀ on a terminal; a caller's own callback replaces it."""
    model = loaded("llama_mha")
    monkeypatch.delenv(ENV, raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    top_singular(model, TEXT, 2, steps=6, block=3)
    assert "eqlin: matrix-free top-2 (lanczos): products with J and Jᵀ: 12/12" in terminal.getvalue()
    shown_before, calls = terminal.getvalue(), []
    top_singular(model, TEXT, 2, steps=6, block=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(6, 12), (12, 12)] and terminal.getvalue() == shown_before
