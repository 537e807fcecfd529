"""Packed low-bit checkpoints: write (atomically) and load back into QuantLinear modules.

The per-linear layouts live in formats.py; this module does files, shards and validation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edgequant.arch import arch_for, blocks_of
from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.formats import (
    FORMATS,
    check_format,
    decode,
    default_format,
    encode,
    expected_shapes,
    quantization_config,
)
from edgequant.modules import QuantLinear, unsigned_codes

SHARD_BYTES = 1 << 30


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full names of the linears the quantization covers, in block order."""
    spec = arch_for(model)
    return {
        f"{spec.blocks}.{i}.{name}": block.get_submodule(name)
        for i, block in enumerate(blocks_of(model, spec))
        for g in spec.groups
        for name in g.linears
    }


@torch.no_grad()
def finalize(model: nn.Module, cfg: QuantConfig, qparams: dict | None = None) -> None:
    """Swap each quantized nn.Linear for a QuantLinear holding its integer codes.

    This is the canonical quantized state that checkpoints pack: scales are rounded to fp16
    as every format stores them. `qparams` (name -> (scale, zero) [out, ng]) come from
    algorithms whose groups need not span the whole code range (GPTQ); otherwise they are
    derived from the fake-quantized weights. Already swapped modules are left alone.
    """
    for name, lin in quantized_modules(model).items():
        if isinstance(lin, QuantLinear):
            if lin.cfg != cfg:
                raise EdgequantError(f"{name} is quantized as {lin.cfg}, not {cfg}")
            continue
        codes, scale, zero = unsigned_codes(lin.weight.float(), cfg, (qparams or {}).get(name))
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg)
        q.codes.copy_(codes)
        q.scale.copy_(scale)
        q.zero.copy_(zero)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias)
        model.set_submodule(name, q.to(lin.weight.device))


def _shared_key(state: dict, key: str, seen: dict) -> bool:
    ptr = (state[key].data_ptr(), state[key].shape)
    if ptr in seen:
        return True
    seen[ptr] = key
    return False


def packed_state(model: nn.Module, cfg: QuantConfig, fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: packed quantized linears + every other tensor as is."""
    finalize(model, cfg)
    mods = quantized_modules(model)
    state = model.state_dict()
    out, seen = {}, {}
    for key in state:
        mod_name, _, leaf = key.rpartition(".")
        if mod_name in mods and leaf in ("codes", "scale", "zero"):
            if leaf == "codes":
                m = mods[mod_name]
                for suffix, t in encode(fmt, m.codes, m.scale, m.zero, cfg).items():
                    out[f"{mod_name}.{suffix}"] = t.contiguous()
        elif not _shared_key(state, key, seen):  # tied weights are stored once
            out[key] = state[key].contiguous()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], tmp: Path) -> None:
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_quantized(model, tokenizer, out: Path, cfg: QuantConfig, fmt: str | None = None) -> None:
    """Write a packed checkpoint to `out`; the directory appears only once complete."""
    fmt = fmt or default_format(cfg)
    check_format(fmt, cfg)
    out = Path(out)
    if out.exists():
        raise EdgequantError(f"output directory {out} already exists")
    mods = quantized_modules(model)
    for name, m in mods.items():
        cfg.groups_for(m.in_features, name)
        if fmt == "awq" and m.out_features % 8:
            raise EdgequantError(
                f"format awq needs out_features % 8 == 0, {name} has {m.out_features}"
            )
    tensors = packed_state(model, cfg, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_shards(tensors, tmp)
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config(fmt, cfg, list(mods))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_quant_config(qc: dict, where: Path) -> tuple[str, QuantConfig]:
    """(format, QuantConfig) from a config.json quantization_config; unknown ones raise."""
    method = qc.get("quant_method")
    if method == "awq":
        if str(qc.get("version", "gemm")).lower() != "gemm" or qc.get("bits", 4) != 4:
            raise EdgequantError(
                f"{where}: awq checkpoint with version {qc.get('version')!r} and "
                f"{qc.get('bits')} bits; edgequant reads the 4-bit GEMM layout"
            )
        return "awq", QuantConfig(4, int(qc["group_size"]), bool(qc.get("zero_point", True)))
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if qc.get("format") != "pack-quantized" or len(groups) != 1:
            raise EdgequantError(
                f"{where}: compressed-tensors format {qc.get('format')!r} with {len(groups)} "
                "config groups; edgequant reads pack-quantized with one group"
            )
        w = groups[0]["weights"]
        group = w.get("group_size") if w.get("strategy") == "group" else -1
        return "compressed-tensors", QuantConfig(int(w["num_bits"]), int(group), not w["symmetric"])
    if method == "edgequant":
        return "edgequant", QuantConfig(int(qc["bits"]), int(qc["group_size"]), qc["zero_point"])
    raise EdgequantError(
        f"{where}: unknown quant_method {method!r}; edgequant reads {', '.join(FORMATS)}"
    )


class Tensors:
    """Tensor names -> shard files of a checkpoint directory, read memory-mapped on demand."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in self._keys(path / "model.safetensors")}
        else:
            raise EdgequantError(f"{path}: no model.safetensors or model.safetensors.index.json")
        for f in sorted(set(weight_map.values())):
            if not (path / f).is_file():
                raise EdgequantError(f"{path / f} is missing (listed in {index.name})")
            keys = self._keys(path / f)
            lost = [k for k, v in weight_map.items() if v == f and k not in keys]
            if lost:
                raise EdgequantError(f"{path / f} lacks tensor {lost[0]} named in {index.name}")
        self.path, self.weight_map = path, weight_map

    @staticmethod
    def _keys(file: Path) -> set[str]:
        try:
            with safe_open(file, "pt") as f:
                return set(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise EdgequantError(f"cannot read {file} (truncated or corrupt?): {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> Path:
        if name not in self.weight_map:
            raise EdgequantError(f"{self.path}: tensor {name} is missing")
        return self.path / self.weight_map[name]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file(name)
        try:
            with safe_open(file, "pt") as f:
                return tuple(f.get_slice(name).get_shape())
        except Exception as e:
            raise EdgequantError(f"cannot read tensor {name} from {file}: {e}") from None

    def get(self, name: str) -> torch.Tensor:
        file = self._file(name)
        try:
            with safe_open(file, "pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise EdgequantError(f"cannot read tensor {name} from {file}: {e}") from None


def load_linear(t: Tensors, fmt: str, cfg: QuantConfig, name: str, out: int, n_in: int) -> dict:
    """Validated (codes, scale, zero[, bias]) state of one quantized [out, n_in] linear."""
    where = t.path / t.weight_map[f"{name}.{MARKER[fmt]}"]
    try:
        shapes = expected_shapes(fmt, cfg, out, n_in)
    except EdgequantError as e:
        raise EdgequantError(f"{where}: {name}: {e}") from None
    parts = {}
    for suffix, shape in shapes.items():
        key = f"{name}.{suffix}"
        if key not in t:
            raise EdgequantError(f"{where}: tensor {key} is missing")
        parts[suffix] = t.get(key)
        if tuple(parts[suffix].shape) != shape:
            raise EdgequantError(
                f"{where}: tensor {key} has shape {tuple(parts[suffix].shape)}, expected {shape} "
                f"for w{cfg.bits} g{cfg.group_size} {out}x{n_in}"
            )
    codes, scale, zero = decode(fmt, parts, cfg, out, n_in)
    state = {"codes": codes, "scale": scale, "zero": zero}
    if f"{name}.bias" in t:
        state["bias"] = t.get(f"{name}.bias")
    return state


MARKER = {"awq": "qweight", "compressed-tensors": "weight_packed", "edgequant": "qweight"}


def quant_method(path: Path) -> str | None:
    """The checkpoint's quant_method if edgequant reads it as packed, else None."""
    config = Path(path) / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def load_quantized(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model with QuantLinear modules straight from packed tensors (no float copy)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise EdgequantError(f"{path} is not a checkpoint directory (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    fmt, cfg = read_quant_config(raw.get("quantization_config") or {}, path / "config.json")
    tensors = Tensors(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    state = {}
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and f"{name}.{MARKER[fmt]}" in tensors:
            parts = load_linear(tensors, fmt, cfg, name, lin.out_features, lin.in_features)
            if (lin.bias is not None) != ("bias" in parts):
                raise EdgequantError(f"{path}: {name}.bias is missing or unexpected")
            q = QuantLinear(lin.in_features, lin.out_features, "bias" in parts, cfg, "meta")
            model.set_submodule(name, q)
            state.update({f"{name}.{k}": v for k, v in parts.items()})
    if not state:
        raise EdgequantError(f"{path}: no {fmt} quantized tensors found")
    for key in model.state_dict():
        if key not in state and key in tensors:
            state[key] = tensors.get(key)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for key, v in list(model.named_parameters()) + list(model.named_buffers()):
        if v.is_meta:
            raise EdgequantError(f"{path}: the checkpoint has no tensor {key}")
    model.config.quantization_config = raw["quantization_config"]
    return model.eval()
