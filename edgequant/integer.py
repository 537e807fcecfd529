"""Integer-only linears: int8 x int8 -> int32 products on the codes of a static model.

After static quantization every block linear sees an input on a static per-tensor grid
(its own "in" point, or the "out" point of the norm feeding its group) and holds weights on
a per-tensor or per-row grid. `to_integer` swaps each one for an `IntLinear`: signed 8-bit
codes for input and weight, one `torch._int_mm` for the sum of products, exact integer zero
point corrections, and one float multiply (the requantization scale) before the output
point's static quantizer rounds the result onto its own grid. Nothing else changes, so the
integer model can be compared with the fake-quantized one it came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.arch import ArchSpec, arch_for, blocks_of
from edgequant.errors import EdgequantError
from edgequant.primitives import static_qparams
from edgequant.static import ActQuant, Quantizers, weight_config


def grid_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w [rows, n] values on one uniform grid per row -> (codes int8 [rows, n] in the signed
    # b-bit range, scale [rows], zero [rows] int32) with w == (codes - zero) * scale
    w = w.float()
    scale = torch.empty(w.shape[0], device=w.device)
    for r, row in enumerate(w):
        vals = torch.unique(row)
        if vals.numel() < 2:
            scale[r] = max(vals.abs().max().item(), 1e-8)
            continue
        step = (vals[1:] - vals[:-1]).min()
        span = vals[-1] - vals[0]
        scale[r] = span / torch.round(span / step)
    k = torch.round(w / scale[:, None])
    # the grid holds 0 (zero-point grids do by construction): keep it inside the codes, so the
    # zero point fits the signed range too
    kmin, kmax = k.amin(1).clamp(max=0), k.amax(1).clamp(min=0)
    if ((kmax - kmin) > 2**bits - 1).any():
        raise EdgequantError(f"weights do not sit on a {bits}-bit grid")
    if not torch.allclose(k * scale[:, None], w, rtol=1e-5, atol=1e-7):
        raise EdgequantError("weights are not on a uniform grid per row")
    shift = kmin + 2 ** (bits - 1)  # codes = k - shift in [-2^(b-1), 2^(b-1) - 1]
    return (k - shift[:, None]).to(torch.int8), scale, (-shift).to(torch.int32)


class IntLinear(nn.Module):
    """y = s_x s_w [sum (a_x - z_x)(a_w - z_w)] (+ bias), the sum in int32 on int8 codes."""

    def __init__(self, lin: nn.Linear, bits: int, per_channel: bool, source: ActQuant):
        super().__init__()
        w = lin.weight.detach()
        rows = w if per_channel else w.reshape(1, -1)
        codes, scale, zero = grid_codes(rows, bits)
        self.register_buffer("codes_t", codes.reshape(w.shape).t().contiguous())  # [in, out]
        out = w.shape[0]
        self.register_buffer("w_scale", scale if per_channel else scale.expand(out).clone())
        self.register_buffer("w_zero", zero if per_channel else zero.expand(out).clone())
        self.register_buffer("col_sum", self.codes_t.sum(0, dtype=torch.int32))  # [out]
        self.bias = lin.bias
        self.source = [source]  # the input's static quantizer (a list: not a submodule)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] on the source's grid -> [..., out] float32
        q = self.source[0]
        s_x, z_x = static_qparams(q.lo * q.unit, q.hi * q.unit, q.bits)
        if q.bits != 8:
            raise EdgequantError(f"{q.name}: integer matmuls need 8-bit inputs, not {q.bits}")
        flat = x.reshape(-1, x.shape[-1]).float()
        a_x = torch.round(flat / s_x) + z_x - 128  # codes 0..255 shifted to int8
        z = z_x.round().to(torch.int32) - 128
        a_x = a_x.clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(a_x, self.codes_t)  # [tokens, out] int32
        acc = acc - self.w_zero * a_x.sum(1, dtype=torch.int32, keepdim=True)
        acc = acc - z * self.col_sum + self.in_features * z * self.w_zero
        y = acc.float() * (s_x * self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def input_point(spec: ArchSpec, name: str) -> str:
    """The precision-map point whose grid a block linear's input sits on."""
    keys = {p.key for p in spec.act_points}
    if f"{name}:in" in keys:
        return f"{name}:in"
    for g in spec.groups:
        if name in g.linears and f"{g.prev}:out" in keys:
            return f"{g.prev}:out"
    raise EdgequantError(f"no static quantizer feeds {name}")


@torch.no_grad()
def to_integer(model: nn.Module, qs: Quantizers) -> None:
    """Swap every block linear of a static-quantized model for its IntLinear, in place."""
    spec = arch_for(model)
    names = [n for g in spec.groups for n in g.linears]
    for i, block in enumerate(blocks_of(model, spec)):
        for name in names:
            lin = block.get_submodule(name)
            qcfg, per_channel = weight_config(name, spec, qs.cfg)
            source = qs.quant[f"{i}/{input_point(spec, name)}".replace(".", "_")]
            new = IntLinear(lin, qcfg.bits, per_channel, source)
            # the quantizers' hooks move over (their handles still remove them)
            new._forward_hooks = lin._forward_hooks
            new._forward_pre_hooks = lin._forward_pre_hooks
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, new)


def reference_linear(x: torch.Tensor, lin: IntLinear) -> torch.Tensor:
    # x [..., in] -> float32 product with the dequantized weight (the fake-quant oracle)
    w = (lin.codes_t.t().float() - lin.w_zero[:, None]) * lin.w_scale[:, None]
    return F.linear(x.float(), w, lin.bias)
