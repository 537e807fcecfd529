"""Checkpoint formats: per-linear tensor layouts and their config.json entries.

Formats (tensors per quantized linear NAME):
- "awq" (AutoAWQ GEMM, 4-bit, zero point, grouped): NAME.qweight int32 [in, out/8],
  NAME.qzeros int32 [in/g, out/8], NAME.scales fp16 [in/g, out]. Read by transformers/vLLM.
- "compressed-tensors" (pack-quantized, 2..8 bits): NAME.weight_packed int32
  [out, ceil(in*b/32)], NAME.weight_scale fp16 [out, in/g], NAME.weight_shape int64 [2],
  and, when asymmetric, NAME.weight_zero_point int32 [ceil(out*b/32), in/g] (packed along
  out). Values are stored offset by 2^(b-1), i.e. as edgequant's unsigned codes.
- "edgequant" (any of 2..8 bits, our INT2/INT3/INT8 layout): NAME.qweight int32
  [out, ceil(in*b/32)] and NAME.qzeros int32 [out, ceil(in/g*b/32)] as dense little-endian
  bit streams along in (see pack.py), NAME.scales fp16 [out, in/g]; w = (q - z) * scale.
Everything else (embeddings, norms, lm_head) is stored as it is in the model.
"""

from __future__ import annotations

import torch

from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.pack import pack_awq_gemm, pack_bits, packed_words, unpack_awq_gemm, unpack_bits

FORMATS = ("awq", "compressed-tensors", "edgequant")


def default_format(cfg: QuantConfig) -> str:
    return "awq" if cfg.bits == 4 and cfg.zero_point and cfg.group_size > 0 else "edgequant"


def check_format(fmt: str, cfg: QuantConfig) -> None:
    if fmt not in FORMATS:
        raise EdgequantError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "awq" and not (cfg.bits == 4 and cfg.zero_point and cfg.group_size > 0):
        raise EdgequantError(
            f"format awq holds 4-bit grouped zero-point weights, not w{cfg.bits} "
            f"g{cfg.group_size} {'asym' if cfg.zero_point else 'sym'}; "
            "use --format compressed-tensors or edgequant"
        )


def quantization_config(fmt: str, cfg: QuantConfig, names: list[str]) -> dict:
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": cfg.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
    if fmt == "compressed-tensors":
        group = cfg.group_size > 0
        weights = {
            "num_bits": cfg.bits,
            "type": "int",
            "symmetric": not cfg.zero_point,
            "strategy": "group" if group else "channel",
            "group_size": cfg.group_size if group else None,
            "dynamic": False,
            "observer": "minmax",
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
        }
    return {
        "quant_method": "edgequant",
        "layout": "bitstream-v1",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "zero_point": cfg.zero_point,
        "modules": names,
    }


def encode(fmt: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg):
    # codes [out, in] uint8, scale/zero [out, ng] -> {suffix: tensor} in the format's layout
    b = cfg.bits
    if fmt == "awq":
        return pack_awq_gemm(codes, zero, scale)
    if fmt == "compressed-tensors":
        t = {
            "weight_packed": pack_bits(codes, b),
            "weight_scale": scale.half(),
            "weight_shape": torch.tensor(codes.shape, dtype=torch.int64),
        }
        if cfg.zero_point:
            t["weight_zero_point"] = pack_bits(zero.T.to(torch.int16), b).T.contiguous()
        return t
    return {
        "qweight": pack_bits(codes, b),
        "qzeros": pack_bits(zero.to(torch.int16), b),
        "scales": scale.half(),
    }


def linear_dims(fmt: str, cfg: QuantConfig, shape, tensor) -> tuple[int, int] | None:
    """(out, in) of a packed linear from its own tensors, or None where the layout leaves
    in_features ambiguous (edgequant's per-channel bit streams are padded to whole words).

    shape(suffix) -> the tensor's shape; tensor(suffix) -> the tensor.
    """
    if fmt == "awq":
        return shape("scales")[1], shape("qweight")[0]
    if fmt == "compressed-tensors":
        out, n_in = tensor("weight_shape").tolist()
        return out, n_in
    if cfg.group_size <= 0:
        return None
    return shape("qweight")[0], shape("scales")[1] * cfg.group_size


def expected_shapes(fmt: str, cfg: QuantConfig, out: int, n_in: int) -> dict[str, tuple]:
    b, ng = cfg.bits, cfg.groups_for(n_in)
    if fmt == "awq":
        return {"qweight": (n_in, out // 8), "qzeros": (ng, out // 8), "scales": (ng, out)}
    if fmt == "compressed-tensors":
        s = {
            "weight_packed": (out, packed_words(n_in, b)),
            "weight_scale": (out, ng),
            "weight_shape": (2,),
        }
        if cfg.zero_point:
            s["weight_zero_point"] = (packed_words(out, b), ng)
        return s
    return {
        "qweight": (out, packed_words(n_in, b)),
        "qzeros": (out, packed_words(ng, b)),
        "scales": (out, ng),
    }


def decode(fmt: str, t: dict[str, torch.Tensor], cfg: QuantConfig, out: int, n_in: int):
    # {suffix: tensor} -> codes [out, in] uint8, scale [out, ng] float32, zero [out, ng] float32
    b, ng = cfg.bits, cfg.groups_for(n_in)
    if fmt == "awq":
        q, zero, scale = unpack_awq_gemm(t["qweight"], t["qzeros"], t["scales"])
        return q.to(torch.uint8), scale, zero
    if fmt == "compressed-tensors":
        q = unpack_bits(t["weight_packed"], b, n_in)
        if cfg.zero_point:
            zero = unpack_bits(t["weight_zero_point"].T.contiguous(), b, out).T.float()
        else:
            zero = torch.full((out, ng), float(2 ** (b - 1)))
        return q.to(torch.uint8), t["weight_scale"].float(), zero.contiguous()
    q = unpack_bits(t["qweight"], b, n_in)
    zero = unpack_bits(t["qzeros"], b, ng).float()
    return q.to(torch.uint8), t["scales"].float(), zero
