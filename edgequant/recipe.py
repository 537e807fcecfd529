"""A quantization recipe: the searched scales and clip bounds, and how to apply them.

Applying a recipe is deterministic: the search calls `apply_group` itself, so a saved recipe
re-applied to the same float model gives bit-identical weights. RTN is the empty recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from edgequant.arch import ArchSpec, ScaleGroup, arch_for, blocks_of, fold_index, fold_into_prev
from edgequant.config import AWQConfig, QuantConfig
from edgequant.errors import EdgequantError
from edgequant.io import atomic_path
from edgequant.primitives import clamp_groups, fake_quantize

FORMAT = "edgequant-recipe/1"


@dataclass
class Recipe:
    quant: QuantConfig
    method: str = "rtn"
    awq: AWQConfig | None = None
    model_type: str = ""
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # "i.group" -> s [C_prev]
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # "i.linear" -> (lo, hi) [out, n_groups]
    fallbacks: list[str] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)
    searched_on: dict = field(default_factory=dict)  # device, seconds, torch of the search

    def save(self, path: str | os.PathLike) -> None:
        """Atomic write: a temporary file in the same directory, then rename."""
        tensors = {f"scale.{k}": v.contiguous().cpu() for k, v in self.scales.items()}
        for k, (lo, hi) in self.clips.items():
            tensors[f"clip_lo.{k}"] = lo.contiguous().cpu()
            tensors[f"clip_hi.{k}"] = hi.contiguous().cpu()
        meta = {
            "format": FORMAT,
            "method": self.method,
            "model_type": self.model_type,
            "quant": asdict(self.quant),
            "awq": asdict(self.awq) if self.awq else None,
            "fallbacks": self.fallbacks,
            "report": self.report,
            "searched_on": self.searched_on,
        }
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata={"edgequant": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise EdgequantError(f"recipe file not found: {path}")
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as f:
                meta = json.loads((f.metadata() or {}).get("edgequant", "null"))
        except Exception as e:  # safetensors raises its own error types
            raise EdgequantError(f"cannot read recipe {path}: {e}") from None
        if not meta or meta.get("format") != FORMAT:
            raise EdgequantError(f"{path} is not an edgequant recipe ({FORMAT})")
        clips = {}
        for k in tensors:
            if k.startswith("clip_lo."):
                key = k[len("clip_lo.") :]
                clips[key] = (tensors[k], tensors[f"clip_hi.{key}"])
        return cls(
            quant=QuantConfig(**meta["quant"]),
            method=meta["method"],
            awq=_awq_config(meta["awq"]),
            model_type=meta["model_type"],
            scales={k[len("scale.") :]: v for k, v in tensors.items() if k.startswith("scale.")},
            clips=clips,
            fallbacks=meta["fallbacks"],
            report=meta["report"],
            searched_on=meta.get("searched_on", {}),
        )


def _awq_config(meta: dict | None) -> AWQConfig | None:
    # recipes from before single_all_tokens was recorded ran without it
    return AWQConfig(**{"single_all_tokens": False, **meta}) if meta else None


def check_group_size(model: nn.Module, spec: ArchSpec, cfg: QuantConfig) -> None:
    """Fail before any work if the group size does not divide a quantized linear."""
    for i, block in enumerate(blocks_of(model, spec)):
        for g in spec.groups:
            for name in g.linears:
                cfg.groups_for(block.get_submodule(name).in_features, f"block {i} {name}")


@torch.no_grad()
def apply_group(
    block: nn.Module,
    spec: ArchSpec,
    group: ScaleGroup,
    cfg: QuantConfig,
    s: torch.Tensor | None,
    clips: dict[str, tuple[torch.Tensor, torch.Tensor]],
    quantize: bool = True,
) -> None:
    """Fold s into the prev op, scale the group's weights by s, clip and fake-quantize them.

    s [C_prev] has one entry per output channel of the prev op; the group's input channels
    take s[fold_index] (a GQA v -> o fold repeats it per query head).

    With quantize=False the weights are only scaled and clamped to the clip bounds (the float
    model another quantizer, e.g. GPTQ, starts from).
    """
    if s is not None:
        fold_into_prev(block.get_submodule(group.prev), s, spec.norm)
        s = s[fold_index(block, group)]
    for name in group.linears:
        lin = block.get_submodule(name)
        w = lin.weight.float()
        if s is not None:
            w = w * s.view(1, -1)
        lo, hi = clips.get(name, (None, None))
        if quantize:
            w = fake_quantize(w, cfg, lo, hi)[0]
        elif hi is not None:
            w = clamp_groups(w, lo, hi, cfg)
        lin.weight.copy_(w.to(lin.weight.dtype))


def apply_recipe(model: nn.Module, recipe: Recipe, quantize: bool = True) -> None:
    """Quantize every block's linears in place as the recipe says (RTN when it is empty).

    quantize=False applies only the equivalent transformation and clipping.
    """
    spec = arch_for(model)
    if recipe.model_type and recipe.model_type != model.config.model_type:
        raise EdgequantError(
            f"recipe was made for model_type {recipe.model_type!r}, not {model.config.model_type!r}"
        )
    check_group_size(model, spec, recipe.quant)
    for i, block in enumerate(blocks_of(model, spec)):
        for g in spec.groups:
            s = recipe.scales.get(f"{i}.{g.name}")
            if s is not None and fold_index(block, g) is None:
                raise EdgequantError(
                    f"recipe has a scale for block {i} {g.name}, which cannot fold"
                )
            clips = {n: recipe.clips[f"{i}.{n}"] for n in g.linears if f"{i}.{n}" in recipe.clips}
            apply_group(block, spec, g, recipe.quant, s, clips, quantize)
