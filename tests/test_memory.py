"""Memory budgets: the limit and the chunk are checked (never silently ignored), sizes are shown in units
that do not round to zero, and a refusal suggests only sizes that do fit."""

from __future__ import annotations

import jax
import pytest

from eqlin.errors import InputError, MemoryBudgetError
from eqlin.families import config_from_hf
from eqlin.memory import estimate_jacobian_bytes, format_bytes, memory_limit_bytes, resolve_chunk

CONFIG = config_from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 2, "num_attention_heads": 4})


@pytest.mark.parametrize("setting", ["abc", "nan", "inf", "-1", "0", "1e-12"])
def test_bad_memory_limit_setting_is_refused(monkeypatch, setting):
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", setting)
    with pytest.raises(InputError, match=f"EQLIN_MEMORY_LIMIT_GB='{setting}' is not a positive number of GiB; set "
                                         "it to e.g. 16, or unset it"):
        memory_limit_bytes()


@pytest.mark.parametrize("setting", ["1e308", "1048577"])
def test_a_memory_limit_setting_beyond_any_machine_is_refused(monkeypatch, setting):
    """1e308 GiB once overflowed converting to bytes (OverflowError); 1 PiB is the most accepted."""
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", setting)
    with pytest.raises(InputError, match=f"EQLIN_MEMORY_LIMIT_GB='{setting}' is more than any machine has \\(at most "
                                         "1048576 GiB, 1 PiB, is accepted\\); set it to the memory eqlin may use"):
        memory_limit_bytes()
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", "1048576")
    assert memory_limit_bytes() == 2**50


def test_memory_limit_setting_and_argument(monkeypatch):
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", "0.5")
    assert memory_limit_bytes() == 2**29 and memory_limit_bytes(1000) == 1000
    for bad in (0, -5, 1.5, "8", True):
        with pytest.raises(InputError, match="memory_limit must be an integer >= 1 "):
            memory_limit_bytes(bad)


@pytest.mark.parametrize("chunk", [0, -1, 1.5, "8", True])
def test_bad_chunk_is_refused(chunk):
    with pytest.raises(InputError, match=r"chunk must be an integer >= 1 \(basis vectors per pass; None picks the "
                                         "largest that fits\\)"):
        resolve_chunk(CONFIG, 8, 1, "rev", chunk, 8, 2**40)


def test_sizes_are_shown_in_readable_units():
    assert [format_bytes(n) for n in (3, 5 * 2**10, 1.5 * 2**20, 2.25 * 2**30)] == [
        "3 bytes", "5.0 KiB", "1.5 MiB", "2.2 GiB"]


def test_refusal_suggests_only_what_fits():
    def cost(T: int, n: int = 1) -> int:
        return estimate_jacobian_bytes(CONFIG, T, n_maps=n, chunk=1)

    limit = cost(10)
    with pytest.raises(MemoryBudgetError) as err:
        resolve_chunk(CONFIG, 40, 1, "rev", None, 8, limit)
    suggested = int(str(err.value).split("at most T=")[1].split()[0])
    assert cost(suggested) <= limit < cost(suggested + 1)
    assert "KiB" in str(err.value) or "MiB" in str(err.value)  # not "0.0 GiB"
    with pytest.raises(MemoryBudgetError) as err:
        resolve_chunk(CONFIG, 8, 1, "rev", None, 8, cost(1) - 1)  # even one token does not fit
    assert "at most T=" not in str(err.value) and "a higher limit (memory_limit or EQLIN_MEMORY_LIMIT_GB)" in str(err.value)
    with pytest.raises(MemoryBudgetError, match=r"at most T=4 tokens, at most 2 layer\(s\) at a time"):
        resolve_chunk(CONFIG, 8, 4, "rev", None, 8, cost(8, 2))


def test_default_budget_is_the_device_minus_its_weights(monkeypatch, loaded):
    """GPUs and TPUs: the allocator's bytes_limit minus the weights there; CPUs: 80 % of RAM minus them.
    An explicit limit or $EQLIN_MEMORY_LIMIT_GB is the computation's own budget, as given."""
    import os

    from eqlin.memory import default_budget, resident_bytes

    monkeypatch.delenv("EQLIN_MEMORY_LIMIT_GB", raising=False)
    assert default_budget("gpu", {"bytes_limit": 80 * 2**30}, 10 * 2**30, 2**30) == 79 * 2**30
    assert default_budget("tpu", {}, 10 * 2**30, 2**30) == 9 * 2**30  # no limit reported: the host's
    assert default_budget("cpu", {"bytes_limit": 80 * 2**30}, 10 * 2**30, 2**30) == 9 * 2**30
    model = loaded("gemma3")
    weights = sum(a.nbytes for a in jax.tree_util.tree_leaves(model.params))
    device = next(iter(model.params.embed.devices()))
    assert resident_bytes(model.params, device) == weights
    host = int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    assert memory_limit_bytes(params=model.params) == host - weights
    assert memory_limit_bytes(12345, params=model.params) == 12345
    monkeypatch.setenv("EQLIN_MEMORY_LIMIT_GB", "2")
    assert memory_limit_bytes(params=model.params) == 2 * 2**30


@pytest.mark.parametrize("variant", ["gemma3", "qwen2"])
def test_the_jacobian_estimate_bounds_the_compiled_peak(loaded, variant):
    """Against XLA's compiled peak of the final map's J (temporaries, J and x; the weights not counted), at
    every chunk: at least 1×, at most 5× (measured 1.49–4.76× over seven families, docs/method.md §3b)."""
    import jax.numpy as jnp

    from eqlin.linear_maps import jacobian_arrays

    model = loaded(variant)
    c, T = model.config, 8
    for chunk in (None, 1):
        x = jax.ShapeDtypeStruct((T, c.hidden_size), jnp.float64)
        compiled = jacobian_arrays.lower(model.params, c, x, layers=None, part="residual", scope="cumulative",
                                         detach=True, mode="rev", chunk=chunk).compile().memory_analysis()
        peak = compiled.temp_size_in_bytes + compiled.output_size_in_bytes + T * c.hidden_size * 8
        assert 1 <= estimate_jacobian_bytes(c, T, chunk=chunk) / peak <= 5, (chunk, peak)
