"""Bit layouts only: integer codes <-> packed int32 tensors. No search, no kernels.

Codes here are unsigned: q in [0, 2^bits). (Symmetric codes are offset by 2^(bits-1) by the
caller, as compressed-tensors does.)

- `pack_bits` / `unpack_bits`: a dense little-endian bit stream along the last dim: value j
  of a row occupies bits [j*bits, (j+1)*bits) of the row's stream, word w holds stream bits
  [32w, 32w + 32). For bits 2, 4, 8 this is plain sequential packing (value j in word
  j // (32/bits) at shift bits * (j % (32/bits))); for bits 3 (and 5..7) values straddle
  words. compressed-tensors `pack-quantized` uses this layout (packed along in_features);
  edgequant's own INT2/3/8 layout does too.
- `pack_awq_gemm` / `unpack_awq_gemm`: AutoAWQ "GEMM" int4: qweight int32 [in, out/8],
  qzeros int32 [in/g, out/8], scales fp16 [in/g, out]; nibble i of each int32 holds output
  column AWQ_ORDER[i] of its group of 8.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def packed_words(n: int, bits: int) -> int:
    """int32 words for n values of `bits` bits (the stream is padded to whole words)."""
    return -(-n * bits // 32)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    # q [rows, n] integer codes in [0, 2^bits) -> [rows, ceil(n * bits / 32)] int32
    rows, n = q.shape
    words = packed_words(n, bits)
    pos = torch.arange(n, dtype=torch.int64) * bits  # first stream bit of each value
    word, shift = pos // 32, pos % 32
    v = q.to(torch.int64) & ((1 << bits) - 1)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.index_add_(1, word, v << shift)  # low part; bits beyond 32 spill into the next word
    spill = (shift + bits > 32).nonzero().flatten()
    if spill.numel():
        out.index_add_(1, word[spill] + 1, v[:, spill] >> (32 - shift[spill]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    # packed [rows, words] int32 -> q [rows, n] int16 codes in [0, 2^bits)
    if packed.shape[-1] != packed_words(n, bits):
        raise ValueError(
            f"packed tensor has {packed.shape[-1]} words, {n} values of {bits} bits need "
            f"{packed_words(n, bits)}"
        )
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    two = w[:, word] | (w[:, word + 1] << 32)  # 64-bit window starting at the value's word
    return ((two >> shift) & ((1 << bits) - 1)).to(torch.int16)


def pack_awq_gemm(
    q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor
) -> dict[str, torch.Tensor]:
    # q [out, in] codes 0..15, zero/scale [out, in/g] -> qweight, qzeros, scales (AutoAWQ GEMM)
    out = q.shape[0]
    if out % 8:
        raise ValueError(f"AWQ GEMM needs out_features divisible by 8, got {out}")
    order = torch.tensor(AWQ_ORDER)

    def pack_cols(v: torch.Tensor) -> torch.Tensor:
        # v [rows, out] -> [rows, out/8]: nibble i <- column AWQ_ORDER[i] of each group of 8
        rows = v.shape[0]
        v = v.reshape(rows, out // 8, 8)[:, :, order].reshape(rows, out)
        return pack_bits(v, 4)

    return {
        "qweight": pack_cols(q.T.contiguous()),
        "qzeros": pack_cols(zero.T.to(torch.int16).contiguous()),
        "scales": scale.T.to(torch.float16).contiguous(),
    }


def unpack_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qweight [in, out/8], qzeros [in/g, out/8], scales [in/g, out] -> q [out, in], zero, scale
    out = scales.shape[1]
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))

    def unpack_cols(p: torch.Tensor) -> torch.Tensor:
        v = unpack_bits(p, 4, out)
        return v.reshape(p.shape[0], out // 8, 8)[:, :, inverse].reshape(p.shape[0], out)

    q = unpack_cols(qweight).T.contiguous()
    zero = unpack_cols(qzeros).T.float().contiguous()
    return q, zero, scales.T.float().contiguous()
