"""eqlin: exact equivalent linear maps of LLM decoders (detached Jacobians), in pure JAX.

Start with `eqlin.load(folder_or_repo_id_or_gguf)`, then `eqlin.detached_jacobian(model, text)` for one
map or `eqlin.layer_spectra(model, text)` for every layer's. The pure forward is
`eqlin.forward(params, config, x, detach=...)`. The method: docs/method.md.
"""

# Models: configuration, parameters, the pure forward, loading.
from eqlin.config import ModelConfig, RopeSpec
from eqlin.decoder import ForwardOutput, embed, final_hidden, forward
from eqlin.model import Model, load
from eqlin.params import LayerParams, Params

# Linear maps: one input, one device.
from eqlin.linear_maps import (
    Linearization,
    LogitMap,
    MatrixFreeCheck,
    detached_jacobian,
    detached_jacobian_at,
    jacobian,
    logit_map,
    matrix_free_check,
)
from eqlin.memory import estimate_jacobian_bytes
from eqlin.detach import DetachError, detach  # any JAX function's detached map, found from its program (docs/detach.md)

# Taking maps apart: spectra, decoding, the layer story.
from eqlin.layer_story import LayerSpectra, MapSpectra, layer_spectra
from eqlin.spectral import Spectrum, decode_spectrum, effective_dimension, norm_analysis, spectrum, top_singular

# Many prompts, many devices.
from eqlin.batch import BatchLinearization, detached_jacobians
from eqlin.sharding import basis_mesh, detached_jacobian_sharded, device_mesh

# Steering.
from eqlin.steering import SteeringResult, steer, steering_sweep

# Errors: every failure caused by input or environment is an EqlinError.
from eqlin.errors import (ConfigError, EqlinError, InputError, MemoryBudgetError, NonFiniteError, OutputError,
                          PrecisionError, WeightsError)

__all__ = [
    # models
    "ModelConfig", "RopeSpec", "ForwardOutput", "embed", "final_hidden", "forward", "Model", "load", "LayerParams",
    "Params",
    # linear maps
    "Linearization", "LogitMap", "MatrixFreeCheck", "detached_jacobian", "detached_jacobian_at", "jacobian",
    "logit_map", "matrix_free_check", "estimate_jacobian_bytes", "detach",
    # taking maps apart
    "LayerSpectra", "MapSpectra", "layer_spectra", "Spectrum", "decode_spectrum", "effective_dimension",
    "norm_analysis", "spectrum", "top_singular",
    # many prompts, many devices
    "BatchLinearization", "detached_jacobians", "basis_mesh", "detached_jacobian_sharded", "device_mesh",
    # steering
    "SteeringResult", "steer", "steering_sweep",
    # errors
    "ConfigError", "DetachError", "EqlinError", "InputError", "MemoryBudgetError", "NonFiniteError", "OutputError",
    "PrecisionError", "WeightsError",
]
