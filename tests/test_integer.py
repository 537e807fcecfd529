import pytest
import torch
from conftest import FACTORIES

from edgequant.arch import arch_for, blocks_of
from edgequant.config import StaticConfig
from edgequant.errors import EdgequantError
from edgequant.integer import IntLinear, grid_codes, reference_linear, to_integer
from edgequant.primitives import static_qparams
from edgequant.smoothquant import smoothquant
from edgequant.static import Quantizers, observe_ranges, quantize_weights


def ids(n=4, t=24, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def static_model(arch, cfg, smooth):
    model = FACTORIES[arch]()
    if smooth:
        smoothquant(model, ids(8, seed=1), StaticConfig(w_bits=cfg.w_bits, search_tokens=64))
    quantize_weights(model, cfg)
    qs = Quantizers(model, cfg)
    observe_ranges(model, qs, ids(8, seed=1))
    return model, qs


@pytest.mark.parametrize("bits,sym", [(8, False), (4, False), (4, True)])
def test_grid_codes_round_trip(bits, sym):
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(6, 1, generator=gen) + 0.1
    lo = -(2 ** (bits - 1)) if sym else 0
    q = torch.randint(lo, lo + 2**bits, (6, 40), generator=gen)
    z = 0 if sym else torch.randint(0, 2**bits, (6, 1), generator=gen)
    w = (q - z) * s
    codes, scale, zero = grid_codes(w, bits)
    assert codes.dtype == torch.int8
    assert codes.int().min() >= -(2 ** (bits - 1)) and codes.int().max() < 2 ** (bits - 1)
    assert torch.allclose((codes.float() - zero[:, None]) * scale[:, None], w, atol=1e-6)
    with pytest.raises(EdgequantError, match="grid"):
        grid_codes(torch.randn(3, 50), bits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("w_bits,smooth", [(8, False), (8, True), (4, True)])
def test_integer_linears_match_fake_quant_within_one_step(arch, w_bits, smooth):
    cfg = StaticConfig(w_bits=w_bits)
    model, qs = static_model(arch, cfg, smooth)
    x = ids(seed=2)
    with torch.no_grad():
        fake = model(x, use_cache=False).logits
    to_integer(model, qs)
    spec = arch_for(model)
    keys = {p.key for p in spec.act_points}
    checked = 0
    for i, block in enumerate(blocks_of(model, spec)):
        for name, lin in block.named_modules():
            if not isinstance(lin, IntLinear):
                continue
            src = lin.source[0]
            inp = src(torch.randn(3, 7, lin.in_features) * (src.hi - src.lo) / 4)
            y_int, y_ref = lin.forward(inp), reference_linear(inp, lin)  # no hooks
            assert torch.allclose(y_int, y_ref, rtol=1e-4, atol=1e-5), name
            if f"{name}:out" in keys:  # requantized onto the output grid: at most one step
                out = qs.quant[f"{i}/{name}:out".replace(".", "_")]
                step, _ = static_qparams(out.lo, out.hi, out.bits)
                assert (out(y_int) - out(y_ref)).abs().max() <= step * 1.01, name
            checked += 1
    assert checked == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        integer = model(x, use_cache=False).logits
    assert (integer - fake).abs().max() < 0.05 * fake.abs().max()
