"""The reference kernel: dequantize the whole weight, then one dense matmul. Runs everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgequant.config import QuantConfig
from edgequant.primitives import dequantize


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    cfg: QuantConfig,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    # x [..., in], codes [out, in] uint8, scale/zero [out, ng], bias [out] -> [..., out] x.dtype
    w = dequantize(codes, scale, zero, cfg).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
