import pytest
import torch

from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.primitives import (
    dequantize,
    fake_quant_static,
    fake_quant_sym,
    fake_quantize,
    least_error_clip,
    quant_params,
    quantize,
    round_ste,
    static_qparams,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 64, -1])
@pytest.mark.parametrize("zp", [True, False])
def test_codes_in_range_and_roundtrip(bits, group, zp):
    torch.manual_seed(bits)
    cfg = QuantConfig(bits, group, zp)
    w = torch.randn(24, 64)
    scale, zero = quant_params(w, cfg)
    q = quantize(w, scale, zero, cfg)
    lo, hi = (0, 2**bits - 1) if zp else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert q.min() >= lo and q.max() <= hi
    deq = dequantize(q, scale, zero, cfg)
    # a dequantized tensor is a fixed point of quantization with the same parameters
    assert torch.equal(quantize(deq, scale, zero, cfg), q)
    # error bounded by half a step (asym) or a step at the clipped edge (sym)
    step = scale.repeat_interleave(cfg.group_len(64), dim=1)
    assert ((deq - w).abs() <= step * (0.5 if zp else 1.0) + 1e-6).all()


def test_more_bits_less_error():
    w = torch.randn(32, 128)
    errs = [(fake_quantize(w, QuantConfig(b, 32))[0] - w).pow(2).mean() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_out_of_range(bits):
    with pytest.raises(EdgequantError, match="bits must be"):
        QuantConfig(bits=bits)


def test_group_size_must_divide():
    with pytest.raises(EdgequantError, match="does not divide in_features 576"):
        QuantConfig(4, 100).groups_for(576, "q_proj")


def _composed_fake_quant_static(x, lo, hi, bits):
    scale, zero = static_qparams(lo, hi, bits)
    q = torch.clamp(round_ste(x.float() / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("per_row", [False, True])
def test_fake_quant_static_matches_the_composed_ops(bits, per_row):
    # the fused autograd function: same values bit for bit, same gradients to rounding, with
    # and without a graph
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 300, generator=gen) * 3
    shape = (6, 1) if per_row else ()
    outs = []
    for f in (fake_quant_static, _composed_fake_quant_static):
        x = x0.clone().requires_grad_()
        lo = torch.full(shape, -4.0, requires_grad=True)
        hi = torch.full(shape, 5.3, requires_grad=True)
        y = f(x, lo, hi, bits)
        (y * torch.linspace(-1, 1, 300)).sum().backward()
        outs.append((y.detach(), x.grad, lo.grad, hi.grad))
    (y, gx, glo, ghi), (y_ref, gx_ref, glo_ref, ghi_ref) = outs
    assert torch.equal(y, y_ref)
    lo0, hi0 = torch.tensor(-4.0), torch.tensor(5.3)
    with torch.no_grad():
        fast = fake_quant_static(x0, lo0, hi0, bits)
    assert torch.equal(fast, _composed_fake_quant_static(x0, lo0, hi0, bits))
    assert torch.allclose(gx, gx_ref, atol=1e-6)
    assert torch.allclose(glo, glo_ref, rtol=1e-5) and torch.allclose(ghi, ghi_ref, rtol=1e-5)
    assert (gx == 0).any() and (gx != 0).any()  # the range clips some of x


@pytest.mark.parametrize("zero_point", [True, False])
def test_least_error_clip_cuts_a_lone_outlier_and_never_loses_to_the_full_range(zero_point):
    w = torch.randn(3, 4096, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 40.0  # row 0: one outlier stretches its grid; the others are plain gaussian
    ratios = torch.linspace(1.0, 0.3, 29)
    r = least_error_clip(w, 4, zero_point, ratios)
    assert r.shape == (3, 1) and r[0].item() < 0.5

    def err(rows, ratio):  # squared rounding error of rows at ratio [rows, 1]
        lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        q = (
            fake_quant_static(rows, ratio * lo, ratio * hi, 4)
            if zero_point
            else fake_quant_sym(rows, ratio * rows.abs().amax(1, keepdim=True), 4)
        )
        return (q - rows).pow(2).sum(1)

    assert (err(w, r) <= err(w, torch.ones(3, 1))).all()
    shared = least_error_clip(w, 4, zero_point, ratios, per_row=False)
    assert shared.shape == (1, 1)
    assert all(err(w, shared).sum() <= err(w, torch.full((3, 1), x)).sum() for x in ratios)


def test_least_error_clip_weighs_each_columns_error():
    w = torch.randn(1, 2048, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 12.0  # an outlier whose column matters a lot, or not at all
    ratios = torch.linspace(1.0, 0.3, 29)
    heavy, light = torch.ones(2048), torch.ones(2048)
    heavy[0], light[0] = 1e4, 0.0
    assert least_error_clip(w, 4, True, ratios, weight=heavy).item() == 1.0  # keep it
    assert least_error_clip(w, 4, True, ratios, weight=light).item() < 0.6  # clip it
