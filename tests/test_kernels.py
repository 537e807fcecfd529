"""Every fast CPU kernel against the reference kernel (dequantize + matmul in float32)."""

import pytest
import torch

from edgequant.config import QuantConfig
from edgequant.kernels import cpu, engine, reference
from edgequant.modules import unsigned_codes
from edgequant.primitives import dequantize


@pytest.fixture(scope="module")
def ext():
    mod = engine.load()
    if mod is None:
        pytest.skip("C++ extension unavailable on this machine")
    return mod


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


@pytest.mark.parametrize("m", [1, 2, 7, 32, 512])
@pytest.mark.parametrize("bits,group,k,n", GRID + [(4, 16, 192, 128), (3, 24, 192, 64)])
def test_engine_int4_kernel_matches_reference(ext, m, bits, group, k, n):
    cfg = QuantConfig(bits, group, zero_point=bits != 3)
    codes, scale, zero = codes_for(n, k, cfg)
    bias = torch.randn(n)
    fast = cpu.fast_linear(codes, scale, zero, cfg, bias, ext)
    assert isinstance(fast, cpu.EngineInt4Linear)
    x = torch.randn(m, k)
    ref = reference.linear(x, codes, scale, zero, cfg, bias)
    y = fast(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    # GEMV rows: activations split into two bf16 parts, float32 scales: near float32;
    # more rows: one bf16 rounding of weights and activations
    assert rel_err(y, ref) < (3e-4 if m <= fast.GEMV_ROWS else 6e-3)


def test_q4_layout_roundtrip_and_dequantization(ext):
    cfg = QuantConfig(4, 32)
    codes, scale, zero = codes_for(64, 256, cfg)
    packed = cpu.pack_q4(codes)
    assert packed.shape == (1, 32, 64) and packed.dtype == torch.int32
    assert torch.equal(cpu.unpack_q4(packed), codes)
    # the documented bit positions: row 0, columns 0..7
    d = int(packed[0, 0, 0]) & 0xFFFFFFFF
    want = [(d >> (4 * (j // 2) + 16 * (j % 2))) & 15 for j in range(8)]
    assert want == codes[0, :8].tolist()
    lin = cpu.EngineInt4Linear.from_codes(codes, scale, zero, cfg, ext)
    w = dequantize(codes, scale, zero, cfg)
    assert torch.allclose(lin.dequantized().float(), w, rtol=2**-8, atol=1e-6)


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


def test_engine_int8_rows_match_float_math(ext):
    torch.manual_seed(0)
    lin = cpu.Int8Linear.from_float(torch.randn(320, 192))
    q, s = lin.qweight, lin.scale.float()
    for x in (torch.randn(192), torch.randn(192) * 1e-3, torch.zeros(192)):
        ref = (q.float() * s[:, None]) @ x
        y = ext.i8_gemv(q, s, x)
        # activations split into two int8 parts (~16 bits): near float32 math
        assert (y - ref).norm() <= 1e-4 * ref.norm() + 1e-12


def test_int4_kernel_takes_a_strided_bf16_input():
    # a bf16 slice (e.g. the last position of a prompt) reaches the fused op without a copy
    cfg = QuantConfig(4, 32)
    fast = cpu.fast_linear(*codes_for(64, 192, cfg), cfg)
    x = torch.randn(2, 5, 192).bfloat16()[:, -1]
    assert not x.is_contiguous()
    assert torch.equal(fast(x), fast(x.contiguous()))


def test_larger_groups_repeat_their_scale():
    cfg = QuantConfig(4, 96)  # 96 = 3 x 32: the op runs at group 32
    codes, scale, zero = codes_for(64, 192, cfg)
    fast = cpu.fast_linear(codes, scale, zero, cfg)
    assert isinstance(fast, cpu.Int4Linear) and fast.group == 32
    x = torch.randn(3, 192)
    assert rel_err(fast(x), reference.linear(x, codes, scale, zero, cfg)) < 6e-3


@pytest.mark.parametrize(
    "heads,kv,t,hd",
    [
        (9, 3, 512, 64),
        (4, 1, 300, 256),
        (4, 2, 37, 16),
        (2, 2, 1, 64),
        (8, 8, 17, 32),
        (6, 2, 5, 48),
    ],
)
def test_prefill_attention_matches_float_causal_attention(ext, heads, kv, t, hd):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(1, n, t, hd, generator=g).mul(2).bfloat16() for n in (heads, kv, kv))
    scale = hd**-0.5
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True
    )
    ref = ref.transpose(1, 2).reshape(1, t, heads * hd)
    out = ext.prefill_attention(q, k, v, scale)
    assert out.shape == (1, t, heads * hd) and out.dtype == torch.bfloat16
    # bf16 probabilities and output: within a few bf16 steps of the float32 result
    assert (out.float() - ref).abs().max() < 2e-2
    # a non-contiguous q (the transposed view the decoder passes) gives the same result
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ext.prefill_attention(qt, k, v, scale), out)
