"""`eqlin convert`: a GGUF file or an HF checkpoint -> one eqlin-ready folder (config.json, a single
float32 model.safetensors with HF names, tokenizer files), written atomically.

The source goes through exactly the checks of loading (`eqlin.model.read_config`, `check_tensors`, the
tokenizer, finite weights), so a converted folder never analyses as another model than its source."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from eqlin.errors import InputError, OutputError
from eqlin.loading import check_tensors, open_weight_files, read_finite
from eqlin.model import checkpoint_folder, read_config
from eqlin.outputs import check_parent_writable, clean_temps, fsync_dir, remove, temp_path
from eqlin.progress import shown, stage
from eqlin.safetensors_io import write_safetensors
from eqlin.tokenizer import Tokenizer

_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "special_tokens_map.json")


def convert(src: str | Path, dst: Path, *, quiet: bool | None = None) -> Path:
    """Write `src` as an eqlin-ready folder at `dst` (which must not exist or be empty); returns dst. Progress on
    stderr: see `eqlin.progress.shown`."""
    quiet = not shown(quiet)
    dst = Path(dst)
    if dst.is_symlink() or dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise InputError(f"{dst} exists and is not an empty folder; choose a new destination")
    check_parent_writable(dst, "choose another destination")
    with stage(f"convert {src}", quiet):
        folder = checkpoint_folder(src)
        spec, config = read_config(folder)
        if (folder / "tokenizer.json").is_file():
            Tokenizer.from_folder(folder)
        files = open_weight_files(folder)
        expected = check_tensors(files, config, spec, folder)
        tensors = read_finite(files, expected, dict.fromkeys(expected, np.dtype(np.float32)))
        tmp = temp_path(dst)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            clean_temps(dst.parent)
            tmp.mkdir()
            write_safetensors(tmp / "model.safetensors", tensors)
            for name in _SIDE_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, tmp / name)
                    with open(tmp / name, "rb") as f:
                        os.fsync(f.fileno())
            fsync_dir(tmp)
            _publish(tmp, dst)
        except OSError as e:
            raise OutputError(f"cannot write {dst}: {e.strerror or e}; nothing was left there; free space on that "
                              "disk or choose another destination") from None
        finally:
            remove(tmp)
    return dst


def _publish(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst` (absent or empty: atomic); refuse if another process filled
    `dst` meanwhile (a second `eqlin convert` to the same folder)."""
    try:
        os.rename(tmp, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise InputError(f"{dst} was filled by another process (another eqlin convert?) while converting; "
                             "it was left as that process wrote it; choose a new destination") from None
        raise
    fsync_dir(dst.parent)
