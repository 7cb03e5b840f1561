"""eqlin: exact equivalent linear maps of LLM decoders (detached Jacobians), in pure JAX.

Start with `eqlin.load(folder_or_repo_id)`; the pure forward is `eqlin.forward(params, config, x)`.
"""

from eqlin.config import ModelConfig, RopeSpec
from eqlin.errors import ConfigError, EqlinError, InputError, MemoryBudgetError, PrecisionError, WeightsError
from eqlin.decoder import ForwardOutput, embed, final_hidden, forward
from eqlin.model import Model, load
from eqlin.params import LayerParams, Params
from eqlin.spectral import Spectrum, decode_spectrum, effective_dimension, norm_analysis, spectrum, top_singular

__all__ = [
    "ConfigError", "EqlinError", "ForwardOutput", "InputError", "LayerParams", "MemoryBudgetError", "Model",
    "ModelConfig", "Params", "PrecisionError", "RopeSpec", "WeightsError", "embed", "final_hidden", "forward",
    "load",
    "Spectrum", "decode_spectrum", "effective_dimension", "norm_analysis", "spectrum", "top_singular",
]
