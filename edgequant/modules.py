"""QuantLinear: a weight-only quantized linear holding integer codes, and its reference kernel.

Codes are unsigned in [0, 2^bits); symmetric weights use the constant zero 2^(bits-1), so one
formula serves both: w = (code - zero) * scale, per (output channel, input group).
"""

from __future__ import annotations

import torch
from torch import nn

from edgequant.config import QuantConfig
from edgequant.kernels import reference
from edgequant.primitives import dequantize


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        cfg: QuantConfig,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        ng = cfg.groups_for(in_features)
        self.register_buffer(
            "codes", torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.empty(out_features, ng, device=device))
        self.register_buffer("zero", torch.empty(out_features, ng, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
            if bias
            else None
        )

    def dequantized(self) -> torch.Tensor:
        # -> w [out, in] float32
        return dequantize(self.codes, self.scale, self.zero, self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]; the reference kernel (fast ones: edgequant.kernels.cpu)
        return reference.linear(x, self.codes, self.scale, self.zero, self.cfg, self.bias)

    def extra_repr(self) -> str:
        c = self.cfg
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, w{c.bits} g{c.group_size}, zero_point={c.zero_point}"


def unsigned_codes(
    w: torch.Tensor,
    cfg: QuantConfig,
    params: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w [out, in] fake-quantized, params (scale, zero) [out, ng] or None (derived from w) ->
    # codes [out, in] uint8, scale [out, ng] (scale_dtype values, float32), zero [out, ng]
    from edgequant.primitives import quant_params, quantize

    scale, zero = params if params is not None else quant_params(w, cfg)
    q = quantize(w, scale, zero, cfg)
    if not cfg.zero_point:
        offset = 2 ** (cfg.bits - 1)
        q, zero = q + offset, torch.full_like(zero, offset)
    return q.to(torch.uint8), scale.to(scale_dtype).float(), zero
