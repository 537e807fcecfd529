"""A packed checkpoint as a bare module tree, for the lean decoder: no HF modeling code.

`load_skeleton(path)` reads config.json and the safetensors and returns modules named as the
checkpoint's tensors are: QuantLinear where a linear is packed, a `Tensors` holder (weight,
bias) elsewhere, and a `Rotary` module where the architecture's DecodeSpec keeps RoPE. That
is all `edgequant.decoder.Decoder` reads, so generation never imports transformers' model
classes (about 85 MB of resident memory on their own) nor builds a float copy of the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from edgequant.arch import arch_for
from edgequant.checkpoint import MARKER, Tensors, load_linear, read_quant_config
from edgequant.errors import EdgequantError
from edgequant.formats import expected_shapes, linear_dims
from edgequant.modules import QuantLinear


class NotLean(EdgequantError):
    """The checkpoint is valid but needs the full HF loader (edgequant.checkpoint)."""


class Holder(nn.Module):
    """A module that only holds tensors (a norm's weight, an embedding, a float linear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        if weight.dim() == 2:
            self.out_features, self.in_features = weight.shape


class Rotary(nn.Module):
    """cos/sin tables as the HF rotary embeddings compute them, from the config alone.

    forward(x, positions[, layer_type]) -> (cos, sin) [1, T, head_dim]; per-layer-type
    parameters where the config keys rope_parameters by layer type (Gemma 3).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        params = config.rope_parameters
        types = getattr(config, "layer_types", None)
        self.per_type = bool(types) and set(types) <= set(params)
        self.tables = {}
        for t in sorted(set(types)) if self.per_type else [None]:
            p = params[t] if t is not None else params
            self.tables[t] = self._inv_freq(p, t)

    def _inv_freq(self, p: dict, layer_type: str | None) -> tuple[torch.Tensor, float]:
        # -> inv_freq [head_dim / 2], attention scaling
        kind = p.get("rope_type", "default")
        if kind == "default":
            cfg = self.config
            dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)), 1.0
        if kind == "dynamic":
            raise NotLean("dynamic RoPE scaling is not supported by the lean loader")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kw = {"layer_type": layer_type} if layer_type is not None else {}
        return ROPE_INIT_FUNCTIONS[kind](self.config, None, **kw)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, layer_type: str | None = None):
        # x (dtype only), pos [1, T] -> cos, sin [1, T, head_dim]
        inv_freq, scaling = self.tables[layer_type if self.per_type else None]
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


# config.json fields the lean decoder reads without HF's config class to fill defaults
REQUIRED = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "rope_parameters",
    "tie_word_embeddings",
)


def _plain_rope(rope: dict) -> bool:
    # rope_parameters, flat or keyed by layer type -> every entry is default RoPE
    entries = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    return all(e.get("rope_type", "default") == "default" and "rope_theta" in e for e in entries)


def read_config(path: Path, raw: dict, needs: tuple[str, ...]):
    """config.json as a plain namespace where it is complete (as transformers >= 5 writes it:
    the `needs` fields, rope_parameters, layer types spelled out, default RoPE); otherwise
    HF's AutoConfig, which fills defaults (and imports torch.distributed and sympy, ~60 MB
    resident, which the plain reading keeps out of a generating process).
    """
    complete = all(k in raw for k in needs) and _plain_rope(raw["rope_parameters"])
    complete = complete and (raw.get("sliding_window") is None or "layer_types" in raw)
    if complete:
        return SimpleNamespace(**raw)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


class Skeleton(nn.Module):
    """The root: `config`, the module tree, and HF's get_output_embeddings."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self, "lm_head", None)


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    # set root.<name> = module, creating empty parents along the dotted path
    *parents, leaf = name.split(".")
    node = root
    for p in parents:
        if not hasattr(node, p):
            node.add_module(p, nn.Module())
        node = getattr(node, p)
    node.add_module(leaf, module)


def _listify(node: nn.Module) -> nn.Module:
    # containers whose children are named 0..n-1 become ModuleLists, in numeric order
    for name, child in list(node.named_children()):
        setattr(node, name, _listify(child))
    names = list(node._modules)
    if type(node) is nn.Module and names and all(n.isdigit() for n in names):
        if sorted(map(int, names)) != list(range(len(names))):
            raise EdgequantError(f"blocks {sorted(map(int, names))} are not numbered 0..n-1")
        return nn.ModuleList(node._modules[str(i)] for i in range(len(names)))
    return node


def load_skeleton(path: str | os.PathLike) -> nn.Module:
    """The packed checkpoint at `path` as a Skeleton the lean decoder is built from.

    Raises NotLean where only the full loader can read it (no lean decoder for the
    architecture, per-channel edgequant layout, dynamic RoPE).
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    fmt, cfg = read_quant_config(raw.get("quantization_config") or {}, path / "config.json")
    tensors = Tensors(path)
    spec = arch_for(Skeleton(SimpleNamespace(**raw)))
    if spec.decode is None:
        raise NotLean(f"no lean decoder for {spec.name} models")
    d = spec.decode
    root = Skeleton(read_config(path, raw, REQUIRED + tuple(f for f in (d.act, d.attn_scale) if f)))
    marker = f".{MARKER[fmt]}"
    used = set()
    for name in sorted(k[: -len(marker)] for k in tensors.weight_map if k.endswith(marker)):
        dims = linear_dims(
            fmt,
            cfg,
            lambda s, n=name: tensors.shape(f"{n}.{s}"),
            lambda s, n=name: tensors.get(f"{n}.{s}"),
        )
        if dims is None:
            raise NotLean(f"{name}: in_features is ambiguous in this layout")
        parts = load_linear(tensors, fmt, cfg, name, *dims)
        q = QuantLinear(dims[1], dims[0], "bias" in parts, cfg, "meta")
        q.load_state_dict(parts, assign=True)
        _place(root, name, q)
        used |= {f"{name}.{s}" for s in [*parts, *expected_shapes(fmt, cfg, *dims)]}
    for key in sorted(set(tensors.weight_map) - used):
        prefix, suffix = key.rsplit(".", 1)
        if suffix == "weight":
            bias = tensors.get(f"{prefix}.bias") if f"{prefix}.bias" in tensors else None
            _place(root, prefix, Holder(tensors.get(key), bias))
    if getattr(root.config, "tie_word_embeddings", False) and hasattr(root, "lm_head"):
        del root.lm_head  # tied: a stored copy of the embedding is not a second table
    if root.get_output_embeddings() is None and not root.config.tie_word_embeddings:
        raise EdgequantError(f"{path}: the checkpoint has no lm_head.weight (untied embeddings)")
    _place(root, d.rotary, Rotary(root.config))
    return _listify(root).eval()
