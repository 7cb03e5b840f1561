"""eqlin.analyze's plan: the full analysis where J and its spectra fit the memory budget, else the matrix-free
one (top-k of the token-combined map, J never built), said on stderr; refusals naming what would fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eqlin
from eqlin.analysis import analyze, plan_analysis
from eqlin.errors import InputError, MemoryBudgetError
from eqlin.memory import estimate_analysis_bytes, estimate_top_k_bytes, format_bytes
from tests.conftest import TEXT

K = 3


@pytest.fixture(scope="module")
def biased(loaded) -> eqlin.Model:
    """Qwen 2: biases, so y = Σ_t J_t x_t + c with c ≠ 0."""
    return loaded("qwen2")


def between(model: eqlin.Model, length: int) -> int:
    """A budget in bytes where the matrix-free top-K fits and the full analysis does not."""
    top, full = estimate_top_k_bytes(model.config, length, k=K), estimate_analysis_bytes(model.config, length)
    assert top < full
    return (top + full) // 2


def test_matrix_free_analysis_equals_the_full_maps_top_k(biased, capsys):
    T = len(biased.encode(TEXT))
    limit = between(biased, T)
    result = analyze(biased, TEXT, layers=(0, 1), top_k=K, memory_limit=limit, quiet=True)
    r = result.report
    assert r["analysis"] == "matrix-free" and r["options"]["analysis"] == "auto" and result.jacobian is None
    plan = r["plan"]
    assert plan["full_bytes"] > limit >= plan["top_k_bytes"] and plan["limit"] == limit and plan["basis"] == "memory_limit"
    assert 0 < plan["longest_full"] < T and plan["full_seconds"] > 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eqlin: the full J does not fit the memory budget: the full J at "
                                                   f"T={T} needs about {format_bytes(plan['full_bytes'])}, about ")
    assert (f"budget {format_bytes(limit)} (memory_limit); longest input whose full J fits: T={plan['longest_full']}; "
            f"running the matrix-free analysis (top-{K} of the token-combined map") in err
    # Against the dense token-combined spectrum of the full J, computed without the limit (measured 1.6e-15).
    lin = eqlin.detached_jacobian(biased, TEXT)
    dense = eqlin.spectrum(lin, K, per_token=False)
    np.testing.assert_allclose(r["spectrum"]["singular_values"], dense.singular_values, rtol=1e-12)
    np.testing.assert_allclose(result.spectrum.U, dense.U, atol=1e-12)  # both sign-aligned with y
    # measured: reconstruction 5.4e-16, homogeneity 5.3e-16, logit 2.5e-16
    assert r["relative_error"] <= 1e-14 and r["homogeneity_error"] <= 1e-14 and r["logit"]["relative_error"] <= 1e-14
    assert r["plain_relative_error"] >= 1e-3
    np.testing.assert_allclose(result.reconstruction, lin.reconstruction, rtol=0, atol=1e-14 * np.linalg.norm(lin.output))
    c = np.asarray(lin.constant)
    assert r["constant"]["norm"] == pytest.approx(np.linalg.norm(c), rel=1e-13) and r["constant"]["tokens"]
    weights = np.array([p["right_weight"] for p in r["per_token"]])  # (T, K): every v_i's shares sum to 1
    np.testing.assert_allclose(weights.sum(0), 1, rtol=1e-13)
    assert [len(p["right_tokens"]) for p in r["per_token"]] == [K] * T
    assert r["layers"] == [] and "layers [0, 1] asked, not computed in a matrix-free analysis" in (
        r["layer_analysis"]["skipped"])
    json.dumps(r, allow_nan=False)
    assert "; matrix-free top-3; relative error" in repr(result)
    page = result._repr_html_()
    assert "not built (matrix-free analysis)" in page and "σ_i of [J_0 … J_{T−1}]" in page


def test_auto_is_the_full_analysis_where_it_fits(biased, capsys):
    plan = plan_analysis(biased, 5, k=K, memory_limit=estimate_analysis_bytes(biased.config, 5))
    assert (plan.analysis, plan.reason, plan.flops_per_second) == ("full", "the full J fits the memory budget", None)
    assert capsys.readouterr().err == ""


def test_full_is_refused_where_it_does_not_fit(biased):
    limit = between(biased, 5)
    with pytest.raises(MemoryBudgetError) as e:
        plan_analysis(biased, 5, k=K, analysis="full", memory_limit=limit)
    assert str(e.value).startswith(f"the full analysis at T=5 needs about "
                                   f"{format_bytes(estimate_analysis_bytes(biased.config, 5))} (J one basis vector")
    assert (f"over the {format_bytes(limit)} budget (memory_limit); use the matrix-free analysis (analysis='auto' or "
            "'matrix-free', eqlin analyze --analysis: top-3 of the map without building J") in str(e.value)
    longest = max(t for t in range(1, 5) if estimate_analysis_bytes(biased.config, t) <= limit)
    assert f"at most T={longest} tokens, or a higher limit (memory_limit or EQLIN_MEMORY_LIMIT_GB)" in str(e.value)


def test_nothing_fits_names_what_would(biased):
    limit = estimate_top_k_bytes(biased.config, 2, k=K)
    with pytest.raises(MemoryBudgetError) as e:
        plan_analysis(biased, 5, k=K, memory_limit=limit)
    assert str(e.value) == (
        f"neither analysis fits the {format_bytes(limit)} budget (memory_limit) at T=5: the full J needs about "
        f"{format_bytes(estimate_analysis_bytes(biased.config, 5))}, the matrix-free top-3 about "
        f"{format_bytes(estimate_top_k_bytes(biased.config, 5, k=K))}; use a shorter text (the top-3 fits up to T=2) "
        f"or --dtype float32 (about {format_bytes(estimate_top_k_bytes(biased.config, 5, k=K, itemsize=4))}, "
        "float32's larger error) or a higher limit (memory_limit or EQLIN_MEMORY_LIMIT_GB) on a machine or GPU with "
        "more memory")


@pytest.mark.parametrize("kwargs, message", [
    (dict(analysis="dense"), "analysis must be one of auto, full, matrix-free, got 'dense'"),
    (dict(analysis="matrix-free", given=True), "lin is a full J: analysis='matrix-free' never builds one"),
])
def test_bad_analysis_arguments(biased, kwargs, message):
    with pytest.raises(InputError, match=message):
        plan_analysis(biased, 5, k=K, **kwargs)
