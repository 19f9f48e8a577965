"""`serving.layers.BaseMatmul`: the packed fast path and the plain path compute the same product."""

from __future__ import annotations

import pytest
import torch

from serving.layers import BaseMatmul


@pytest.mark.parametrize("with_bias", [False, True])
def test_base_matmul_equals_the_plain_product_at_the_packed_and_other_row_counts(with_bias):
    generator = torch.Generator().manual_seed(0)
    weight_t = torch.randn(48, 80, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    matmul = BaseMatmul(weight_t, bias, rows=6)
    assert (matmul.packed is not None) == torch.backends.mkl.is_available()
    for rows in (6, 1, 7, 40):  # the packed row count, then the fallback
        x = torch.randn(rows, 48, generator=generator)
        expected = x @ weight_t + (bias if with_bias else 0)
        torch.testing.assert_close(matmul(x), expected, rtol=1e-5, atol=1e-5)
