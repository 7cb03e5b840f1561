"""Jacobians on 8 (forced host) devices equal the one-device Jacobian: basis-sharded with replicated
weights bit for bit, tensor-parallel weights to float64 rounding. The device count must be set before
JAX starts, so each check runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from jax.sharding import AxisType

from eqlin.errors import InputError, MemoryBudgetError
from eqlin.linear_maps import detached_jacobian
from eqlin.params import partition_specs
from eqlin.sharding import detached_jacobian_sharded, device_memory_limit, device_mesh, sharded_jacobian_bytes
from eqlin import reference as ref
from tests.conftest import TEXT, VS_TORCH, relative

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import eqlin
    from eqlin.linear_maps import detached_jacobian
    from eqlin.sharding import _sharded_rows, device_mesh, detached_jacobian_sharded

    folder, text, n_model = sys.argv[1], sys.argv[2], int(sys.argv[3])
    one = detached_jacobian(eqlin.load(folder), text, chunk=3, fold=False)  # as each basis group: unfolded
    mesh = device_mesh(model=n_model)
    model = eqlin.load(folder, mesh=mesh)  # weights placed shard by shard as they load
    many = detached_jacobian_sharded(model, text, mesh=mesh, chunk=3)
    compiled = _sharded_rows.lower(model.params, model.config, many.inputs, mesh=mesh, chunk=3).compile()
    hlo = compiled.as_text()
    leaves = jax.tree_util.tree_leaves(model.params)
    up = model.params.layers.up_proj
    print(json.dumps({
        "devices": len(jax.devices()),
        "shards": len(many.jacobian.sharding.device_set),
        "row_blocks": len({str(s.index) for s in many.jacobian.addressable_shards}),
        "max_abs_diff": float(np.max(np.abs(np.asarray(many.jacobian) - np.asarray(one.jacobian)))),
        "max_abs": float(np.max(np.abs(np.asarray(one.jacobian)))),
        "relative_error": float(many.relative_error),
        "up_shard_rows": up.addressable_shards[0].data.shape[1], "up_rows": up.shape[1],
        "param_bytes": sum(a.nbytes for a in leaves),
        "param_bytes_per_device": sum(a.addressable_shards[0].data.nbytes for a in leaves),
        "argument_bytes_per_device": compiled.memory_analysis().argument_size_in_bytes,
        "all_gathers": hlo.count(" all-gather(") + hlo.count(" all-gather-start("),
        "all_reduces": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
    }))
""")


def run_on_8_devices(folder, n_model: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), TEXT, str(n_model)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_basis_sharded_jacobian_equals_one_device(checkpoint):
    result = run_on_8_devices(checkpoint("gemma3"), 1)
    assert result["devices"] == 8 and result["shards"] == 8 and result["row_blocks"] == 8
    assert result["max_abs_diff"] == 0.0, result  # the same ops per row: identical, not merely close
    assert result["relative_error"] <= 1e-14  # measured 6.5e-16
    assert result["all_reduces"] == 0 and result["param_bytes_per_device"] == result["param_bytes"]


@pytest.mark.parametrize("variant, n_model", [("gemma3", 4), ("olmo2", 2)])
def test_tensor_parallel_jacobian_equals_one_device(checkpoint, variant, n_model):
    """Weights split over n_model devices (OLMo 2's full-width q/k norm then reduces across them), the
    basis over the other 8 / n_model: J matches one device to rounding, and no weight is ever gathered."""
    result = run_on_8_devices(checkpoint(variant), n_model)
    assert result["shards"] == 8 and result["row_blocks"] == 8 // n_model, result  # a row block per basis group
    assert result["max_abs_diff"] <= 1e-14 * result["max_abs"], result  # measured 5.8e-16, 8.5e-16
    assert result["relative_error"] <= 1e-14  # measured 4.5e-16, 6.0e-16
    assert result["up_shard_rows"] * n_model == result["up_rows"]
    assert result["param_bytes_per_device"] < 0.75 * result["param_bytes"], result
    assert result["argument_bytes_per_device"] < 0.75 * result["param_bytes"], result
    assert result["all_gathers"] == 0 and result["all_reduces"] > 0, result


def test_the_sharded_jacobian_carries_the_constant(loaded):
    model = loaded("qwen2")
    sharded = detached_jacobian_sharded(model, TEXT, mesh=device_mesh())
    single = detached_jacobian(model, TEXT)
    scale = float(np.abs(single.output).max())
    np.testing.assert_allclose(sharded.constant, single.constant, rtol=0, atol=1e-14 * scale)
    assert float(sharded.relative_error) <= 1e-13
    specs = partition_specs(model.params, model.config, 2).layers
    assert specs.q_bias == specs.k_bias == specs.v_bias == jax.sharding.PartitionSpec(None, "model")


def test_sharded_jacobian_checks_memory_before_allocating(loaded, reference):
    """On this process's one device: refuse when one basis vector does not fit, name the chunk that does,
    and pick it when no chunk is given."""
    model = loaded("gemma3")
    mesh = device_mesh()
    T = len(model.ids(TEXT))
    param_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(model.params))

    def cost(chunk: int) -> int:
        return sharded_jacobian_bytes(model.config, T, mesh, chunk=chunk, itemsize=8, param_bytes=param_bytes)

    with pytest.raises(MemoryBudgetError,
                       match="even one basis vector at a time, over the .* per-device limit; add devices to the "
                       "\"basis\" axis \\(J's rows\\) or the \"model\" axis \\(the weights\\), or use fewer tokens"):
        detached_jacobian_sharded(model, TEXT, mesh=mesh, memory_limit=cost(1) - 1)
    with pytest.raises(MemoryBudgetError,
                       match=r"chunk=6 needs about .* per device, over the .* limit; use chunk=5 or less"):
        detached_jacobian_sharded(model, TEXT, mesh=mesh, chunk=6, memory_limit=cost(5))
    auto = detached_jacobian_sharded(model, TEXT, mesh=mesh, memory_limit=cost(5))
    one = detached_jacobian(model, TEXT, chunk=5, fold=False)  # unfolded, as each basis group
    assert np.array_equal(np.asarray(auto.jacobian), np.asarray(one.jacobian))
    assert auto.relative_error <= 1e-14  # measured 8.9e-16
    expected = ref.final_jacobian(reference("gemma3"), torch.tensor(model.ids(TEXT)))
    assert relative(auto.jacobian, expected) <= VS_TORCH  # the sharded path, graded by PyTorch too


EXPLICIT = jax.make_mesh((1, 1), ("basis", "model"), (AxisType.Explicit, AxisType.Explicit))  # make_mesh's default


@pytest.mark.parametrize("mesh", ["2x4", 8, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",)), EXPLICIT])
def test_a_bad_mesh_is_refused(loaded, mesh):
    with pytest.raises(InputError, match="mesh must be a jax.sharding.Mesh with axes \\('basis', 'model'\\) of type "
                       "AxisType.Auto.*eqlin.device_mesh"):
        detached_jacobian_sharded(loaded("llama_mha"), TEXT, mesh=mesh)


def test_device_mesh_is_made_by_make_mesh_with_auto_axes():
    mesh = device_mesh()
    assert mesh.axis_names == ("basis", "model") and mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert mesh.devices.shape == (len(jax.devices()), 1) and list(mesh.devices.flat) == jax.devices()
    with pytest.raises(InputError, match="model=3 must be a positive divisor of the 1 devices"):
        device_mesh(model=3)


def test_a_mesh_without_this_process_devices_is_refused(monkeypatch):
    """A multi-host mesh must hold some of this process's devices (the memory budget is read on one of them):
    seen from a process index that owns none of the mesh's devices, an InputError names the recipe."""
    mesh = device_mesh()
    monkeypatch.setattr(jax, "process_index", lambda: 7)
    with pytest.raises(InputError, match=r"the mesh holds none of process 7's devices: every process of a "
                                         r"multi-host run builds the same mesh over jax.devices\(\)"):
        device_memory_limit(mesh)
