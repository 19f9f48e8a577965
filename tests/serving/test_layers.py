"""`serving.layers.BaseMatmul`: every decode kernel and the plain path compute the same product; the kernel
is measured once per shape and kept."""

from __future__ import annotations

import pytest
import torch

from serving import layers
from serving.layers import DECODE_KERNELS, BaseMatmul, decode_kernel, decode_kernels


@pytest.mark.parametrize("kernel", [k for k in DECODE_KERNELS if k != "packed" or torch.backends.mkl.is_available()])
@pytest.mark.parametrize("with_bias", [False, True])
def test_each_decode_kernel_equals_the_plain_product_at_its_row_count_and_others(monkeypatch, kernel, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight_t = torch.randn(48, 80, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    monkeypatch.setitem(layers._chosen, (48, 80, 6, torch.get_num_threads()), kernel)
    matmul = BaseMatmul(weight_t, bias, rows=6)
    assert matmul.kernel == kernel and (matmul.w is None) == (kernel == "mm")
    for rows in (6, 1, 7, 40):  # the decode row count, then the fallback
        x = torch.randn(rows, 48, generator=generator)
        expected = x @ weight_t + (bias if with_bias else 0)
        torch.testing.assert_close(matmul(x), expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_measured_once_per_shape_and_only_for_float32_on_the_cpu():
    chosen = decode_kernel(64, 96, 4)
    assert chosen in DECODE_KERNELS and decode_kernels()[(64, 96, 4, torch.get_num_threads())] == chosen
    assert all(decode_kernel(64, 96, 4) == chosen for _ in range(3))  # cached: no second measurement to disagree
    assert BaseMatmul(torch.zeros(64, 96, dtype=torch.float64), None, rows=4).kernel == "mm"
    assert BaseMatmul(torch.zeros(64, 96), None, rows=None).kernel == "mm"
