"""Every fast CPU kernel against the reference kernel (dequantize + matmul in float32)."""

import pytest
import torch

from edgequant.config import QuantConfig
from edgequant.kernels import cpu, reference
from edgequant.modules import unsigned_codes


def codes_for(n, k, cfg, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * torch.rand(1, k) * 2  # uneven input channels
    return unsigned_codes(w, cfg)


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


GRID = [
    (bits, group, k, n)
    for bits in (2, 3, 4)
    for group in (32, 64, 128, 256, -1)
    for k, n in ((256, 64), (512, 192))
    if group == -1 or k % group == 0
]


@pytest.mark.parametrize("m", [1, 2, 7, 32, 512])
@pytest.mark.parametrize("bits,group,k,n", GRID)
def test_int4_kernel_matches_reference(m, bits, group, k, n):
    cfg = QuantConfig(bits, group, zero_point=bits != 3)
    codes, scale, zero = codes_for(n, k, cfg)
    bias = torch.randn(n)
    fast = cpu.fast_linear(codes, scale, zero, cfg, bias)
    assert isinstance(fast, cpu.Int4Linear)
    x = torch.randn(m, k)
    ref = reference.linear(x, codes, scale, zero, cfg, bias)
    y = fast(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert rel_err(y, ref) < 6e-3  # bf16 activations and scales: about 2^-9 each


def test_int4_pack_roundtrip_and_3d_input():
    cfg = QuantConfig(4, 64)
    codes, scale, zero = codes_for(128, 256, cfg)
    assert torch.equal(cpu.unpack_int4(cpu.pack_int4(codes)), codes)
    fast = cpu.fast_linear(codes, scale, zero, cfg)
    x = torch.randn(2, 5, 256)
    ref = reference.linear(x, codes, scale, zero, cfg)
    assert fast(x).shape == (2, 5, 128) and rel_err(fast(x), ref) < 1e-2


@pytest.mark.parametrize(
    "bits,group,n", [(8, 64, 64), (5, 32, 64), (4, 16, 64), (4, 64, 48), (4, 24, 64)]
)
def test_other_layouts_take_the_slower_path(bits, group, n):
    cfg = QuantConfig(bits, group)
    codes, scale, zero = codes_for(n, 192, cfg)
    fast = cpu.fast_linear(codes, scale, zero, cfg)
    assert isinstance(fast, cpu.ReferenceLinear)
    x = torch.randn(3, 192)
    assert rel_err(fast(x), reference.linear(x, codes, scale, zero, cfg)) < 1e-2


@pytest.mark.parametrize("m", [1, 7, 512])
def test_int8_rows(m):
    torch.manual_seed(0)
    w = torch.randn(320, 64)
    lin = cpu.Int8Linear.from_float(w)
    x = torch.randn(m, 64)
    assert rel_err(lin(x), x @ w.T) < 1e-2


def test_larger_groups_repeat_their_scale():
    cfg = QuantConfig(4, 96)  # 96 = 3 x 32: the op runs at group 32
    codes, scale, zero = codes_for(64, 192, cfg)
    fast = cpu.fast_linear(codes, scale, zero, cfg)
    assert isinstance(fast, cpu.Int4Linear) and fast.group == 32
    x = torch.randn(3, 192)
    assert rel_err(fast(x), reference.linear(x, codes, scale, zero, cfg)) < 6e-3
