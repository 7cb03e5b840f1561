"""eqlin: exact equivalent linear maps of LLM decoders (detached Jacobians), in pure JAX.

Start with `eqlin.load(folder_or_repo_id_or_gguf)`, then `eqlin.detached_jacobian(model, text)`.
The pure forward is `eqlin.forward(params, config, x, detach=...)`.
"""

from eqlin.batch import BatchLinearization, detached_jacobians
from eqlin.config import ModelConfig, RopeSpec
from eqlin.decoder import ForwardOutput, embed, final_hidden, forward
from eqlin.errors import ConfigError, EqlinError, InputError, MemoryBudgetError, PrecisionError, WeightsError
from eqlin.linear_maps import (
    Linearization,
    LogitMap,
    MatrixFreeCheck,
    detached_jacobian,
    jacobian,
    logit_map,
    matrix_free_check,
)
from eqlin.layer_story import LayerSpectra, MapSpectra, layer_spectra
from eqlin.memory import estimate_jacobian_bytes
from eqlin.model import Model, load
from eqlin.params import LayerParams, Params
from eqlin.sharding import basis_mesh, detached_jacobian_sharded, device_mesh
from eqlin.spectral import Spectrum, decode_spectrum, effective_dimension, norm_analysis, spectrum, top_singular
from eqlin.steering import SteeringResult, steer, steering_sweep

__all__ = [
    "BatchLinearization", "ConfigError", "EqlinError", "ForwardOutput", "InputError", "LayerParams", "LayerSpectra",
    "Linearization", "MapSpectra",
    "LogitMap", "MatrixFreeCheck", "MemoryBudgetError", "Model", "ModelConfig", "Params", "PrecisionError",
    "RopeSpec", "Spectrum", "SteeringResult", "WeightsError", "basis_mesh", "decode_spectrum", "detached_jacobian",
    "detached_jacobian_sharded", "detached_jacobians", "device_mesh", "effective_dimension", "embed", "estimate_jacobian_bytes",
    "final_hidden", "forward", "jacobian", "layer_spectra", "load", "logit_map", "matrix_free_check", "norm_analysis", "spectrum",
    "steer", "steering_sweep", "top_singular",
]
