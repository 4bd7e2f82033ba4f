"""The public op names of `rwkvx_kernels` call the same functions as their subpackages' entry points."""

import torch

import rwkvx_kernels
from rwkvx_kernels.sparse_attention import sparse_attention_naive
from rwkvx_kernels.wkv7 import wkv7_naive


def test_wkv7_and_sparse_attention_are_callable_by_package_name():
    g = torch.Generator().manual_seed(0)
    r, k, v, a, b = (torch.randn(1, 20, 2, 64, generator=g, dtype=torch.float64) * 0.3 for _ in range(5))
    w = -0.6 * torch.sigmoid(torch.randn(1, 20, 2, 64, generator=g, dtype=torch.float64))
    y, _ = rwkvx_kernels.wkv7(r, w, k, v, a, b, backend="naive")
    torch.testing.assert_close(y, wkv7_naive(r, w, k, v, a, b)[0])
    q = torch.randn(1, 40, 2, 64, generator=g, dtype=torch.float64)
    got = rwkvx_kernels.sparse_attention(q, q.flip(1), q * 0.5, 8, 2, backend="naive")
    torch.testing.assert_close(got, sparse_attention_naive(q, q.flip(1), q * 0.5, 8, 2))
    assert rwkvx_kernels.wkv7.naive.wkv7_naive is wkv7_naive  # submodules keep working
