"""`eqlin convert`: a GGUF file or an HF checkpoint -> one eqlin-ready folder (config.json, a single
float32 model.safetensors with HF names, tokenizer files), written atomically."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from eqlin.errors import InputError
from eqlin.families import config_from_hf, spec_for
from eqlin.loading import (check_tied_head, expected_tensors, open_weight_files, read_json, resolve_folder,
                           text_prefixes)
from eqlin.progress import stage
from eqlin.safetensors_io import write_safetensors

_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "special_tokens_map.json")


def convert(src: str | Path, dst: Path, *, quiet: bool = False) -> Path:
    """Write `src` as an eqlin-ready folder at `dst` (which must not exist or be empty); returns dst."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst} exists and is not an empty folder; choose a new destination")
    with stage(f"convert {src}", quiet):
        if str(src).endswith(".gguf"):
            from eqlin.gguf import converted_folder

            folder = converted_folder(Path(src))
        else:
            folder = resolve_folder(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
        try:
            _write_folder(folder, tmp)
            if dst.exists():
                dst.rmdir()
            tmp.rename(dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dst


def _write_folder(folder: Path, out: Path) -> None:
    """The text decoder's tensors as float32 in one file, plus config and tokenizer files."""
    hf = read_json(folder / "config.json")
    spec, config = spec_for(hf), config_from_hf(hf)
    files = open_weight_files(folder)
    prefix, head = text_prefixes(set(files))
    check_tied_head(files, config, prefix, head)
    names = expected_tensors(config, spec, prefix, head)
    missing = sorted(set(names) - set(files))
    if missing:
        raise InputError(f"{folder} lacks tensors {missing[:5]}; it is not a complete checkpoint")
    write_safetensors(out / "model.safetensors",
                      {n: np.asarray(files[n].read(n), dtype=np.float32) for n in names})
    for name in _SIDE_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
