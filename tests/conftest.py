"""Shared test fixtures: x64 on, tiny random checkpoints written once per session, their PyTorch references, and
a temporary eqlin cache folder for the whole session."""

from __future__ import annotations

import os

# Tiny test models: compile time dominates, so compile with less backend optimisation (same float semantics).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import contextlib  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import eqlin  # noqa: E402
from eqlin.reference import load_transformers  # noqa: E402
from tests.fixtures import make_checkpoint  # noqa: E402

CORE_VARIANTS = ("llama_mha", "llama_gqa", "qwen3", "gemma3", "gemma3_multimodal")
MORE_VARIANTS = ("mistral", "phi3", "olmo2")
# The PyTorch references run tiny models, where one intra-op thread is as fast and never spin-waits (OpenMP) for a
# descheduled second thread: on a busy 2-core machine test_reference.py took 59-85 s with two threads and
# 7-10 s with one.
torch.set_num_threads(1)

# Configurations the family checkpoints leave off: sliding windows on Phi-3 and Qwen 3, softcapping, a stored
# copy of a tied lm_head (see tests/fixtures.py).
OPTION_VARIANTS = ("phi3_sliding", "qwen3_sliding", "gemma3_softcap", "llama_tied_head")
AFFINE_VARIANTS = ("qwen2", "gpt2")  # biases: every detached map is affine, y = Σ_t J_t x_t + c
LONGROPE_TEXTS = (  # phi3_longrope: original_max_position_embeddings 16, so short factors, then long ones
    "The bridge out of Marin is the Golden Gate",
    "The bridge out of Marin is the Golden Gate . the fog goes over the bay and the red bridge",
)
TEXT = "The bridge out of Marin is the Golden Gate"  # 9 or 10 tokens: longer than the 4-token sliding windows
# eqlin against the float64 PyTorch reference (J, layer maps, logit maps, outputs): measured at most 3.9e-15 over
# every variant, map, part and scope (test_linear_maps); asserted with a margin of about 8.
VS_TORCH = 3e-14


@pytest.fixture(scope="module", autouse=True)
def compiled_functions_released():
    """Compiled executables are dropped after each test module. Without this, one process compiling the whole
    suite's thousands of functions crashed inside XLA's compiler (a segmentation fault in test_steering.py,
    twice in a row; never when that module ran alone); with it, the process holds about 1,200 memory
    mappings at every module's end. Suspected cause, ruled out only in part: in-process `eqlin.cli.main`
    turned JAX's persistent compilation cache on for the whole process until it stopped doing so (issue
    29); without this fixture, one process then ran 638 of the 723 tests (up to test_sharding.py) without
    a crash before a 40-minute limit on a busy 2-core machine, never reaching test_steering.py."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session", autouse=True)
def eqlin_cache_dir():
    """EQLIN_CACHE_DIR in a temporary folder for the whole session (subprocesses inherit it), deleted at the end:
    no test reads or writes the user's ~/.cache/eqlin. The embedded model's GGUF conversion (1.1 GB, about 30 s)
    then happens once per session, in whichever test needs the model first, and JAX's persistent compilation
    cache of the CLI runs starts empty."""
    with tempfile.TemporaryDirectory(prefix="eqlin-cache-") as cache, pytest.MonkeyPatch.context() as mp:
        mp.setenv("EQLIN_CACHE_DIR", cache)
        yield pathlib.Path(cache)


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


@pytest.fixture(scope="session")
def reference(checkpoint):
    """reference(variant, detached=True) -> the transformers model of that checkpoint in float64, made
    float64-faithful (and, with `detached`, detached) in memory by eqlin/reference.py; once per session."""
    from eqlin import reference as ref

    models: dict = {}

    def get(variant: str, detached: bool = True):
        if (variant, detached) not in models:
            model = load_transformers(checkpoint(variant))
            models[variant, detached] = ref.make_detached(model) if detached else ref.make_float64_faithful(model)
        return models[variant, detached]

    return get


def subspace_cosines(A, B) -> np.ndarray:
    """Cosines of the principal angles between the column spans of A and B (orthonormal columns)."""
    return np.linalg.svd(np.asarray(A).T @ np.asarray(B), compute_uv=False)


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


@pytest.fixture(scope="session")
def matrix_free_report(loaded, checkpoint, tmp_path_factory):
    """(exit code, output folder, stdout, stderr, budget in bytes) of `eqlin analyze` on the tiny Gemma 3 under an
    EQLIN_MEMORY_LIMIT_GB where its top-3 fits and the full analysis does not: the matrix-free analysis."""
    from eqlin.cli import main
    from eqlin.memory import estimate_analysis_bytes, estimate_top_k_bytes

    config, length = loaded("gemma3").config, len(loaded("gemma3").encode(TEXT))
    limit = (estimate_top_k_bytes(config, length, k=3) + estimate_analysis_bytes(config, length)) // 2
    out, stdout, stderr = tmp_path_factory.mktemp("matrix-free") / "report", io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setenv("EQLIN_MEMORY_LIMIT_GB", repr(limit / 2**30))
        code = main(["analyze", TEXT, "--model", str(checkpoint("gemma3")), "--out", str(out), "--top-k", "3", "-q",
                     "--no-compile-cache"])
    return code, out, stdout.getvalue(), stderr.getvalue(), limit


# --- slow tests: the README's examples on the embedded model ------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (README.md's examples on the embedded model: minutes)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped, saying so and how to run them, unless --run-slow is given."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (README.md's examples on the embedded model, several minutes): run "
                                   "`pytest --run-slow`, as README.md's test command and .ci/run do")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
