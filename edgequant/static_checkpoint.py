"""Integer-only (static W8A8 / W4A8) checkpoints: int8 weight codes plus the range table.

Every block linear is stored as `weight_int8` (signed codes), `weight_scale` and
`weight_zero` per output row (w = (codes - zero) * scale); every other tensor as is.
config.json's quantization_config holds the static configuration and the activation range
table (bits, lo, hi per precision-map point per block). Loading rebuilds the float model,
writes the dequantized weights and attaches the quantizers at those ranges.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgequant.arch import arch_for, blocks_of
from edgequant.config import STATIC_QUANT_METHOD, StaticConfig
from edgequant.errors import EdgequantError
from edgequant.integer import grid_codes
from edgequant.static import Quantizers, weight_config

METHOD = STATIC_QUANT_METHOD


def static_state(model: nn.Module, cfg: StaticConfig) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: block linears as int8 codes, everything else as is."""
    spec = arch_for(model)
    state, seen = {}, set()
    linears = {}
    for i in range(len(blocks_of(model, spec))):
        for g in spec.groups:
            for name in g.linears:
                linears[f"{spec.blocks}.{i}.{name}"] = weight_config(name, spec, cfg)
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied (lm_head = embeddings): stored once
            continue
        seen.add(t.data_ptr())
        prefix = key.removesuffix(".weight")
        if prefix in linears and key.endswith(".weight"):
            qcfg, per_channel = linears[prefix]
            rows = t if per_channel else t.reshape(1, -1)
            codes, scale, zero = grid_codes(rows, qcfg.bits)
            n = t.shape[0]
            state[f"{prefix}.weight_int8"] = codes.reshape(t.shape).contiguous()
            state[f"{prefix}.weight_scale"] = scale if per_channel else scale.expand(n).clone()
            state[f"{prefix}.weight_zero"] = zero if per_channel else zero.expand(n).clone()
        else:
            state[key] = t.detach().contiguous()
    return state


def save_static(model: nn.Module, qs: Quantizers, tokenizer, out: Path) -> None:
    """Write the checkpoint to `out`; the directory appears only once complete."""
    out = Path(out)
    if out.exists():
        raise EdgequantError(f"output directory {out} already exists")
    state = static_state(model, qs.cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("_attn_implementation", None)
        config["quantization_config"] = {
            "quant_method": METHOD,
            "version": 1,
            "static": asdict(qs.cfg),
            "activation_ranges": qs.table(),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _config(path: Path) -> dict:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgequantError(f"{path}: unreadable config.json ({e})") from None
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != METHOD or qc.get("version") != 1:
        raise EdgequantError(f"{path} is not an {METHOD} checkpoint (version 1)")
    return qc


def load_static(path: str | os.PathLike) -> tuple[nn.Module, Quantizers]:
    """Rebuild (model with dequantized weights, its quantizers at the stored ranges)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = _config(path)
    try:
        cfg, ranges = (
            StaticConfig(**{"calib_bos": False, **qc["static"]}),
            dict(qc["activation_ranges"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EdgequantError(f"{path}: incomplete quantization_config ({e!r})") from None
    try:
        tensors = load_file(path / "model.safetensors")
    except Exception as e:  # safetensors raises its own error types
        raise EdgequantError(f"{path}: cannot read model.safetensors ({e})") from None
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key, t in tensors.items():
        if key.endswith(".weight_int8"):
            prefix = key.removesuffix(".weight_int8")
            scale, zero = tensors[f"{prefix}.weight_scale"], tensors[f"{prefix}.weight_zero"]
            state[f"{prefix}.weight"] = (t.float() - zero[:, None]) * scale[:, None]
        elif not key.endswith((".weight_scale", ".weight_zero")):
            state[key] = t
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise EdgequantError(f"{path}: tensors missing {sorted(set(missing) - tied)[:5]}")
    model.tie_weights()
    qs = Quantizers(model.eval(), cfg)
    for q in qs.quant.values():
        if q.name not in ranges:
            raise EdgequantError(f"{path}: no activation range for {q.name}")
        r = ranges[q.name]
        with torch.no_grad():
            q.lo.fill_(r["lo"])
            q.hi.fill_(r["hi"])
    qs.freeze()
    return model, qs
