"""Shared test fixtures: x64 on, tiny random checkpoints written once per session."""

from __future__ import annotations

import os

# Tiny test models: compile time dominates, so compile with less backend optimisation (same float semantics).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pathlib  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import eqlin  # noqa: E402
from tests.fixtures import make_checkpoint  # noqa: E402

CORE_VARIANTS = ("llama_mha", "llama_gqa", "qwen3", "gemma3", "gemma3_multimodal")
MORE_VARIANTS = ("mistral", "phi3", "olmo2")
AFFINE_VARIANTS = ("qwen2", "gpt2")  # biases: every detached map is affine, y = Σ_t J_t x_t + c
LONGROPE_TEXTS = (  # phi3_longrope: original_max_position_embeddings 16, so short factors, then long ones
    "The bridge out of Marin is the Golden Gate",
    "The bridge out of Marin is the Golden Gate . the fog goes over the bay and the red bridge",
)
TEXT = "The bridge out of Marin is the Golden Gate"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[[str], pathlib.Path]:
    """checkpoint(variant) -> folder of a tiny random float32 checkpoint, written once per session."""
    made: dict[str, pathlib.Path] = {}

    def get(variant: str) -> pathlib.Path:
        if variant not in made:
            made[variant] = make_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoint) -> Callable[[str], eqlin.Model]:
    """loaded(variant) -> the eqlin float64 Model of that checkpoint, loaded once per session."""
    models: dict[str, eqlin.Model] = {}

    def get(variant: str) -> eqlin.Model:
        if variant not in models:
            models[variant] = eqlin.load(checkpoint(variant))
        return models[variant]

    return get


def relative(a, b) -> float:
    """‖a − b‖ / ‖b‖."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny_report(checkpoint, tmp_path_factory):
    """(exit code, output folder) of `eqlin analyze` on the tiny Gemma 3 with every layer map."""
    from eqlin.cli import main

    out = tmp_path_factory.mktemp("report")
    code = main(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(out), "--layers", "all",
                 "--top-k", "3", "-q", "--no-compile-cache"])
    return code, out
