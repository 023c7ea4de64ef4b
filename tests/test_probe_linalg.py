"""``outer_product_moments`` against the per-sample outer products formed directly, in both
orientations of its product (``k_in < k_out`` forms ``G_i^T``), with groups and chunks; the
per-sample reductions against their definitions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from lightning_gradwatch.probe._linalg import (
    SMALL_ROWS_ELEMENTS,
    outer_product_moments,
    row_sq_norm,
    rowdot,
    rows_times,
    sq_norm,
)


@pytest.mark.parametrize("k_in,k_out", [(3, 7), (7, 3), (5, 5)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("budget", [2**20, 60])  # one chunk; several chunks of samples
@pytest.mark.parametrize("keep", [False, True])
def test_outer_product_moments_matches_direct(
    k_in: int, k_out: int, groups: int, budget: int, keep: bool
) -> None:
    torch.manual_seed(0)
    batch, steps = 6, 4
    a = torch.randn(batch, steps, groups, k_in, dtype=torch.float64)
    delta = torch.randn(batch, steps, groups, k_out, dtype=torch.float64)
    expected = torch.einsum("btgo,btgk->bgok", delta, a)  # (B, G, O, K)
    sq_norm, sum_sq, grad_sample, grad_sum = outer_product_moments(a, delta, True, keep, budget)
    assert_close(sq_norm, expected.flatten(1).pow(2).sum(1), "sq_norm")
    assert sum_sq is not None and grad_sum is not None
    assert sum_sq.is_contiguous() and grad_sum.is_contiguous()
    assert_close(sum_sq, expected.pow(2).sum(0), "sum_sq")
    assert_close(grad_sum, expected.sum(0), "grad_sum")
    if keep:
        assert grad_sample is not None
        assert_close(grad_sample, expected, "grad_sample")
    else:
        assert grad_sample is None
    # Without the sum (autograd's batch gradient is used instead), the rest is unchanged.
    sq2, sum_sq2, _, none = outer_product_moments(a, delta, True, keep, budget, need_sum=False)
    assert none is None
    assert sum_sq2 is not None
    assert_close(sq2, sq_norm, "sq_norm without the sum")
    assert_close(sum_sq2, sum_sq, "sum_sq without the sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [7, 2**14 // 4, 2**14 // 4 + 1, 30000])
def test_row_reductions_on_both_sides_of_the_small_bound(dtype: torch.dtype, width: int) -> None:
    """``row_sq_norm``, ``rowdot``, ``rows_times`` and ``sq_norm`` choose their kernels by size
    (``SMALL_ROWS_ELEMENTS``): below, at, just over and far over the bound (4 rows) they agree
    with the definitions computed in float64."""
    assert SMALL_ROWS_ELEMENTS == 2**14  # the widths above straddle it with 4 rows
    generator = torch.Generator().manual_seed(width)
    x = torch.randn(4, width, generator=generator, dtype=dtype)
    y = torch.randn(4, width, generator=generator, dtype=dtype)
    v = torch.randn(width, generator=generator, dtype=dtype)
    xd, yd, vd = x.double(), y.double(), v.double()
    checks = {
        "row_sq_norm": (row_sq_norm(x), (xd * xd).sum(1)),
        "rowdot": (rowdot(x, y), (xd * yd).sum(1)),
        "rows_times": (rows_times(x, v), xd @ vd),
        "sq_norm": (sq_norm(x.reshape(-1)), (xd * xd).sum()),
    }
    for name, (got, want) in checks.items():
        assert got.dtype == dtype, name
        assert_close(got, want, name)
