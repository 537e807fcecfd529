import pytest
import torch

from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.primitives import dequantize, fake_quantize, quant_params, quantize


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
