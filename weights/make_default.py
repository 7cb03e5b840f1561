"""Write the embedded default model (Gemma 3 270M GGUF from PyPI) as an eqlin-ready folder here."""

from pathlib import Path

from eqlin.convert import convert
from eqlin.gguf import default_model_path

if __name__ == "__main__":
    print(convert(default_model_path(), Path(__file__).parent / "gemma3-270m"))
