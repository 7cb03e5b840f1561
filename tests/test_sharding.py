"""The basis-sharded Jacobian on 8 (forced host) devices equals the one-device Jacobian. The device count
must be set before JAX starts, so the check runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import TEXT

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import eqlin
    from eqlin.linear_maps import detached_jacobian
    from eqlin.sharding import basis_mesh, detached_jacobian_sharded

    model = eqlin.load(sys.argv[1])
    one = detached_jacobian(model, sys.argv[2], chunk=3)
    many = detached_jacobian_sharded(model, sys.argv[2], mesh=basis_mesh(), chunk=3)
    diff = np.asarray(many.jacobian) - np.asarray(one.jacobian)
    print(json.dumps({
        "devices": len(jax.devices()),
        "shards": len(many.jacobian.sharding.device_set),
        "max_abs_diff": float(np.max(np.abs(diff))),
        "relative_error": float(many.relative_error),
    }))
""")


def test_basis_sharded_jacobian_equals_one_device(checkpoint):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint("gemma3")), TEXT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["shards"] == 8
    assert result["max_abs_diff"] == 0.0, result  # the same ops per row: identical, not merely close
    assert result["relative_error"] <= 1e-13
