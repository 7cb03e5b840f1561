"""`eqlin convert` applies exactly the checks of loading, and leaves either a complete folder or nothing:
never a silently different model, never a half-written or clobbered destination."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from eqlin import convert as convert_module
from eqlin.cli import EXIT_BAD_INPUT, EXIT_OK, main
from eqlin.safetensors_io import SafetensorsFile, write_safetensors
from tests.fixtures import small_filesystem


def _broken(checkpoint, tmp_path, change) -> object:
    folder = shutil.copytree(checkpoint("llama_mha"), tmp_path / "src")
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: np.array(f.read(n)) for n in f.header}
    change(tensors)
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def _convert(src, dst, capsys) -> tuple[int, str]:
    code = main(["convert", str(src), str(dst), "-q", "--no-compile-cache"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     r"biases on the linear path \(model.layers.0.self_attn.q_proj.bias\)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((80, 31), np.float32)}),
     r"wrong shape \(1\): model.layers.0.mlp.up_proj.weight: \(80, 31\) \(expected \(80, 32\)\)"),
    (lambda t: t["model.norm.weight"].__setitem__(0, np.inf), "tensors hold NaN or infinite values"),
])
def test_convert_refuses_what_loading_refuses(checkpoint, tmp_path, capsys, change, message):
    """Bias tensors without a config flag, mis-shaped and non-finite tensors: no converted copy that would
    analyse as another model."""
    code, err = _convert(_broken(checkpoint, tmp_path, change), tmp_path / "dst", capsys)
    assert code == EXIT_BAD_INPUT and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_what_loading_refuses_in_config_and_tokenizer(checkpoint, tmp_path, capsys):
    folder = shutil.copytree(checkpoint("llama_mha"), tmp_path / "src")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok, "bos_token": ["<bos>"]}))
    code, err = _convert(folder, tmp_path / "dst", capsys)
    assert code == EXIT_BAD_INPUT and "bos_token must be a token string" in err
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_skew": 1}))
    code, err = _convert(folder, tmp_path / "dst", capsys)
    assert code == EXIT_BAD_INPUT and "keys eqlin does not know for llama: rope_skew=1" in err
    assert not (tmp_path / "dst").exists()


def test_a_destination_filled_meanwhile_is_left_to_its_writer(checkpoint, tmp_path, capsys, monkeypatch):
    """Two converts to one folder: the one that finishes second is refused and changes nothing there."""
    dst, real = tmp_path / "dst", convert_module.write_safetensors

    def other_process_wins(path, tensors, **kwargs):
        real(path, tensors, **kwargs)
        dst.mkdir()
        (dst / "model.safetensors").write_bytes(b"theirs")

    monkeypatch.setattr(convert_module, "write_safetensors", other_process_wins)
    code, err = _convert(checkpoint("llama_mha"), dst, capsys)
    assert code == EXIT_BAD_INPUT and "was filled by another process (another eqlin convert?)" in err
    assert (dst / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_disk_full_while_converting(checkpoint, tmp_path, capsys):
    """A real full disk (a 64 KiB filesystem; the float32 weights take 107 KiB): the safetensors library's
    SafetensorError once came out as a traceback, exit 1."""
    with small_filesystem(tmp_path / "disk") as disk:
        code, err = _convert(checkpoint("llama_mha"), disk / "dst", capsys)
        assert code == EXIT_BAD_INPUT, err
        assert (f"cannot write {disk / 'dst'}: No space left on device; nothing was left there; free space on that "
                "disk or choose another destination") in err
        assert list(disk.iterdir()) == []


def test_a_non_empty_destination_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    code, err = _convert(checkpoint("llama_mha"), tmp_path / "dst", capsys)
    assert code == EXIT_BAD_INPUT and "exists and is not an empty folder; choose a new destination" in err
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]
    (tmp_path / "dst" / "keep.txt").unlink()
    assert _convert(checkpoint("llama_mha"), tmp_path / "dst", capsys)[0] == EXIT_OK  # an empty one is used
