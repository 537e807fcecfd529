"""Fused low-bit CPU kernels for weight-only quantized linears (W4A16, W8A16).

Where the C++ extension builds (edgequant.kernels.engine: AVX512-BF16/VNNI, a compiler),
2- to 4-bit weights live in edgequant's own int4 layout (`pack_q4`) as `EngineInt4Linear`:
one or two rows run the extension's exact GEMV, more rows dequantize to bf16 in C++ once per
call and run a dense bf16 matmul. Elsewhere `Int4Linear` keeps torch's fused op:

Decode (few rows) runs torch's fused int4 CPU op, which reads the 4-bit weights directly:
`_weight_int4pack_mm_for_cpu(x bf16 [M, K], packed [N, K/2], group, sz [K/g, N, 2])`
computes x @ ((q - 8) * s + zf)^T, so a zero point z becomes zf = (8 - z) * s, rounded to bf16.
INT2/INT3 checkpoints run on the same op at the same speed, their codes stored as q - z + 8
(which fits 4 bits) so that zf is exactly 0.
Prefill (many rows) unpacks the same bytes to a bf16 weight once per call and runs a dense
bf16 matmul, which beats the fused op from about 16 rows up on this CPU (benchmarks/speed.py).

Per-channel 8-bit weights (the tied lm_head, W8 g-1 checkpoints) run `_weight_int8pack_mm`.
Anything else (other group sizes, N not a multiple of 64) keeps the reference kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.config import QuantConfig
from edgequant.kernels import reference

PREFILL_ROWS = 16  # from this many rows on, dequantize to bf16 and use a dense matmul
INT4_GROUPS = (256, 128, 64, 32)  # group sizes the fused op accepts
BLOCK_N = 64  # the op's packed layout: [N / 64, K, 32] bytes, column n + 32 in the high nibble


def int4_group(cfg: QuantConfig, in_features: int) -> int | None:
    """The op's group size for this config (a larger group repeats its scale), or None."""
    g = cfg.group_len(in_features)
    if cfg.bits > 4:
        return None
    return next((k for k in INT4_GROUPS if g % k == 0), None)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    # codes [N, K] uint8 in 0..15 -> packed [N, K/2] uint8 in the op's layout
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    # packed [N, K/2] uint8 -> codes [N, K] uint8
    n, k = packed.shape[0], packed.shape[1] * 2
    p = packed.view(n // BLOCK_N, k, BLOCK_N // 2)
    both = torch.stack((p & 15, p >> 4), dim=1)  # [N/64, 2, K, 32]
    return both.transpose(2, 3).reshape(n, k)


def int4_scales_zeros(
    scale: torch.Tensor, zero: torch.Tensor, group: int, kernel_group: int
) -> torch.Tensor:
    # scale/zero [N, K/group] -> [K/kernel_group, N, 2] float32 (scale, zf = (8 - zero) * scale)
    rep = group // kernel_group
    s = scale.float().repeat_interleave(rep, dim=1)
    z = zero.float().repeat_interleave(rep, dim=1)
    return torch.stack((s, (8.0 - z) * s), dim=-1).transpose(0, 1).contiguous()


class Int4Linear(nn.Module):
    """Weights as 4-bit codes in the fused op's layout; bf16 activations inside.

    sz holds the (scale, zf) pairs in bf16, the precision torch's op takes.
    """

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, group: int, bias=None):
        super().__init__()
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("sz", sz.bfloat16())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def from_codes(cls, codes, scale, zero, cfg: QuantConfig, bias=None) -> Int4Linear:
        # codes [N, K] uint8, scale/zero [N, ng], bias [N] or None
        n, k = codes.shape
        group = int4_group(cfg, k)
        if group is None or n % BLOCK_N:
            raise ValueError(f"int4 kernel cannot take w{cfg.bits} g{cfg.group_size} [{n}, {k}]")
        g = cfg.group_len(k)
        if cfg.bits <= 3:  # q - z + 8 fits 4 bits: the zero moves into the codes, zf = 0 exactly
            z = zero.repeat_interleave(g, dim=1)
            codes, zero = (codes.float() - z + 8).to(torch.uint8), torch.full_like(zero, 8.0)
        packed = pack_int4(codes)
        if not torch.equal(unpack_int4(packed), codes):  # the layout is torch's, not ours
            raise RuntimeError("torch's int4 CPU packing changed layout; cannot unpack it")
        sz = int4_scales_zeros(scale, zero, g, group)
        return cls(packed, sz, group, bias)

    def dequantized(self) -> torch.Tensor:
        # -> w [N, K] bf16, the weight the fused op computes with
        q = unpack_int4(self.packed).view(self.out_features, -1, self.group)
        sz = self.sz.transpose(0, 1).unsqueeze(-2)  # [N, K/g, 1, 2]
        w = (q.to(torch.bfloat16) - 8) * sz[..., 0] + sz[..., 1]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x.dtype
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] < PREFILL_ROWS:  # the fused op refuses strided rows (a sliced bf16 x)
            x2 = x2.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.sz)
        else:
            y = F.linear(x2, self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


Q4_ROWS = 64  # rows per block of edgequant's int4 layout


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    # codes [N, K] uint8 in 0..15 -> [N/64, K/8, 64] int32: the dword of (row, columns
    # k..k+7) holds column k+2j in bits 4j..4j+3 and k+2j+1 in bits 16+4j.. (j = 0..3)
    n, k = codes.shape
    c = codes.to(torch.int32).view(n // Q4_ROWS, Q4_ROWS, k // 8, 4, 2)
    shift = torch.arange(4, dtype=torch.int32) * 4
    dword = ((c[..., 0] << shift) | (c[..., 1] << (shift + 16))).sum(-1, dtype=torch.int32)
    return dword.transpose(1, 2).contiguous()  # disjoint bits: the sum is the bitwise or


def dword_codes(d: torch.Tensor) -> torch.Tensor:
    # d [...] int32 dwords of the int4 layout -> [..., 8] int32 codes of columns k..k+7
    shift = torch.arange(4, dtype=torch.int32) * 4
    d = d.unsqueeze(-1)
    return torch.stack(((d >> shift) & 15, (d >> (shift + 16)) & 15), dim=-1).flatten(-2)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    # packed [N/64, K/8, 64] int32 -> codes [N, K] uint8
    nb, k8, _ = packed.shape
    codes = dword_codes(packed.transpose(1, 2))  # [N/64, 64, K/8, 8]
    return codes.reshape(nb * Q4_ROWS, k8 * 8).to(torch.uint8)


def q4_params(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # scale/zero [N, ng] -> scale fp16, zero uint8, each [N/64, ng, 64] (w = (q - z) * s)
    n, ng = scale.shape

    def blocked(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n // Q4_ROWS, Q4_ROWS, ng).transpose(1, 2).contiguous()

    return blocked(scale.half()), blocked(zero.to(torch.uint8))


def q4_exact(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether fp16 scales and uint8 zeros hold these qparams exactly."""
    s, z = scale.float(), zero.float()
    return torch.equal(s.half().float(), s) and torch.equal(z.round().clamp(0, 255), z)


class EngineInt4Linear(nn.Module):
    """2- to 4-bit weights in edgequant's int4 layout, run by the C++ extension.

    Scales are fp16 and zeros uint8 (3 bytes per row and group; checkpoints store fp16
    scales, so this is exact). Up to GEMV_ROWS rows: one GEMV per row, near float32 math;
    more rows: the weight dequantized to bf16 in C++ once per call, then a bf16 matmul.
    """

    GEMV_ROWS = 2

    def __init__(self, packed, scale, zero, group: int, ext, bias=None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0] * Q4_ROWS, packed.shape[1] * 8
        self.group, self.ext = group, ext
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if bias is None else bias.float())

    def q4(self) -> tuple:
        """(packed, scale, zero, group): the arguments of the extension's int4 functions."""
        return self.packed, self.scale, self.zero, self.group

    @staticmethod
    def takes(cfg: QuantConfig, n: int, k: int) -> bool:
        g = cfg.group_len(k)
        return cfg.bits <= 4 and n % Q4_ROWS == 0 and g % 8 == 0 and k % g == 0

    @classmethod
    def from_codes(cls, codes, scale, zero, cfg: QuantConfig, ext, bias=None) -> EngineInt4Linear:
        # codes [N, K] uint8, scale/zero [N, ng], bias [N] or None; ext: the loaded extension
        n, k = codes.shape
        if not cls.takes(cfg, n, k):
            raise ValueError(f"int4 layout cannot take w{cfg.bits} g{cfg.group_size} [{n}, {k}]")
        return cls(pack_q4(codes), *q4_params(scale, zero), cfg.group_len(k), ext, bias)

    def dequantized(self) -> torch.Tensor:
        # -> w [N, K] bf16, the weight the prefill matmul uses
        return self.ext.q4_dequant_t(*self.q4()).t()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [T] -> [T, K] float32: rows of the weight (an embedding lookup on a tied head)
        unit, lane = ids // Q4_ROWS, ids % Q4_ROWS
        q = dword_codes(self.packed[unit, :, lane])  # [T, K/8, 8]
        s = self.scale[unit, :, lane].float().repeat_interleave(self.group, dim=1)  # [T, K]
        z = self.zero[unit, :, lane].float().repeat_interleave(self.group, dim=1)
        return (q.reshape(ids.shape[0], -1).float() - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= self.GEMV_ROWS:
            y = self.ext.q4_gemv(*self.q4(), x2, self.bias)
        else:
            wt = self.ext.q4_dequant_t(*self.q4())  # [K, N]
            y = x2.to(torch.bfloat16) @ wt
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Linear(nn.Module):
    """Per-output-channel symmetric int8 weights: w = q * scale, q in -127..127."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias=None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.bfloat16())
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None) -> Int8Linear:
        # w [N, K] float -> per-row absmax int8 (the lm_head's near-lossless compression)
        scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x.dtype
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class ReferenceLinear(nn.Module):
    """The slower path for layouts no fused op takes: dequantize per call, matmul in x.dtype."""

    def __init__(self, codes, scale, zero, cfg: QuantConfig, bias=None):
        super().__init__()
        self.cfg, self.out_features, self.in_features = cfg, *codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x.dtype
        return reference.linear(x, self.codes, self.scale, self.zero, self.cfg, self.bias)


class DenseLinear(nn.Module):
    """A float weight stored in `dtype`; inputs are cast to it and outputs back."""

    def __init__(self, weight: torch.Tensor, bias=None, dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x.dtype
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def fast_linear(codes, scale, zero, cfg: QuantConfig, bias=None, ext=None) -> nn.Module:
    """The fastest kernel module that takes these codes exactly.

    ext: the loaded C++ extension (edgequant.kernels.engine.load()), or None for torch's ops.
    """
    n, k = codes.shape
    if ext is not None and EngineInt4Linear.takes(cfg, n, k) and q4_exact(scale, zero):
        return EngineInt4Linear.from_codes(codes, scale, zero, cfg, ext, bias)
    if int4_group(cfg, k) is not None and n % BLOCK_N == 0:
        return Int4Linear.from_codes(codes, scale, zero, cfg, bias)
    return ReferenceLinear(codes, scale, zero, cfg, bias)
