"""Write the tests' tiny random checkpoints here, one folder per variant (needs the `test` extra)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures import VARIANTS, make_checkpoint  # noqa: E402

if __name__ == "__main__":
    for variant in VARIANTS:
        print(make_checkpoint(Path(__file__).parent / f"tiny-{variant}", variant))
