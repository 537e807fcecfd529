"""The architecture table: the only place that knows module names of model families.

Each family lists its decoder blocks and, per block, the AWQ scale groups: linears that
share an input, the previous op the per-channel scale folds into, and the module whose
output the exact search compares.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class ScaleGroup:
    name: str
    prev: str  # module (relative to the block) whose output is the group's input
    linears: tuple[str, ...]
    inspect: str  # module whose output the exact loss compares
    heads: str | None = None  # attention module whose head_dim lays out a GQA v -> o fold


@dataclass(frozen=True)
class ActPoint:
    """A static activation quantizer (the precision map of integer-only execution).

    where: "in" / "out" of `module` (relative to the block), or, inside the attention
    module's softmax attention, "k" / "v" (the KV cache, after RoPE), "scores" (softmax
    input) and "probs" (softmax output). bits 8 points follow StaticConfig.a_bits.
    """

    module: str
    where: str
    bits: int

    @property
    def key(self) -> str:
        return f"{self.module}:{self.where}"


def _precision_map(
    attn_norm: str, mlp_norm: str, extra: tuple[ActPoint, ...] = ()
) -> tuple[ActPoint, ...]:
    # MobileQuant's W8A8 with selective A16: 8-bit linear inputs and outputs, V and the KV
    # cache; 16-bit residual stream (norm inputs), o_proj / down_proj outputs and softmax
    a, m = "self_attn", "mlp"
    return (
        ActPoint(attn_norm, "in", 16),
        ActPoint(attn_norm, "out", 8),
        *(ActPoint(f"{a}.{p}_proj", "out", 8) for p in "qkv"),
        ActPoint(a, "k", 8),
        ActPoint(a, "v", 8),
        ActPoint(a, "scores", 16),
        ActPoint(a, "probs", 16),
        ActPoint(f"{a}.o_proj", "in", 8),
        ActPoint(f"{a}.o_proj", "out", 16),
        ActPoint(mlp_norm, "in", 16),
        ActPoint(mlp_norm, "out", 8),
        ActPoint(f"{m}.gate_proj", "out", 8),
        ActPoint(f"{m}.up_proj", "out", 8),
        ActPoint(f"{m}.down_proj", "in", 8),
        ActPoint(f"{m}.down_proj", "out", 16),
        *extra,
    )


@dataclass(frozen=True)
class DecodeSpec:
    """What the lean decoder (edgequant.decoder) needs beyond the HF config's standard fields.

    Module paths are relative to the model (embed, final_norm, rotary) or to a block.
    """

    embed: str = "model.embed_tokens"
    embed_scale: bool = False  # embeddings are multiplied by sqrt(hidden_size)
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    rotary_takes_layer_type: bool = False  # rotary(x, positions, layer_type): per-type RoPE
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    attn_post_norm: str | None = None  # applied to the attention output before the residual
    mlp_norm: str = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    qk_norm: tuple[str, str] | None = None  # per-head norms of q and k, before RoPE
    act: str = "hidden_act"  # config field naming the MLP activation
    attn_scale: str | None = None  # config field s, softmax scale s^-0.5 (default head_dim)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # path of the ModuleList of decoder blocks
    norm: str  # "rms" (x * w), "rms_one_plus" (x * (1 + w)) or "layernorm" (x * w + b)
    groups: tuple[ScaleGroup, ...]
    no_clip: tuple[str, ...]  # linears skipped by the clip search (q/k: softmax is sensitive)
    decode: DecodeSpec | None = None  # None: no lean decoder, generation goes through HF
    act_points: tuple[ActPoint, ...] = ()  # () : no integer-only (static W8A8) support
    w8_per_channel: tuple[str, ...] = ()  # linears whose 8-bit weights keep a scale per row


def _attn_mlp(norm_attn: str, norm_mlp: str, attn: str, mlp: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup(
            "attn_in", norm_attn, (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), attn
        ),
        ScaleGroup("attn_out", f"{attn}.v_proj", (f"{attn}.o_proj",), f"{attn}.o_proj", attn),
        ScaleGroup("mlp_in", norm_mlp, (f"{mlp}.gate_proj", f"{mlp}.up_proj"), mlp),
        ScaleGroup("mlp_out", f"{mlp}.up_proj", (f"{mlp}.down_proj",), f"{mlp}.down_proj"),
    )


LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks="model.layers",
    norm="rms",
    groups=_attn_mlp("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    decode=DecodeSpec(),
    act_points=_precision_map("input_layernorm", "post_attention_layernorm"),
    w8_per_channel=("mlp.down_proj",),
)

QWEN3 = replace(
    LLAMA,
    name="qwen3",
    model_types=("qwen3",),
    decode=DecodeSpec(qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
)

GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text",),
    blocks="model.layers",
    norm="rms_one_plus",
    groups=_attn_mlp("input_layernorm", "pre_feedforward_layernorm", "self_attn", "mlp"),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    decode=DecodeSpec(
        embed_scale=True,
        rotary_takes_layer_type=True,
        attn_post_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
        act="hidden_activation",
        attn_scale="query_pre_attn_scalar",
    ),
    act_points=_precision_map(
        "input_layernorm",
        "pre_feedforward_layernorm",
        # the post-norms of the attention and MLP outputs feed the 16-bit residual stream
        (
            ActPoint("post_attention_layernorm", "out", 16),
            ActPoint("post_feedforward_layernorm", "out", 16),
        ),
    ),
    w8_per_channel=("mlp.down_proj",),
)

OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    norm="layernorm",
    groups=(
        ScaleGroup(
            "attn_in",
            "self_attn_layer_norm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        ScaleGroup("attn_out", "self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScaleGroup("mlp_in", "final_layer_norm", ("fc1",), "fc1"),
        ScaleGroup("mlp_out", "fc1", ("fc2",), "fc2"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

ARCHS = (LLAMA, QWEN3, GEMMA3, OPT)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for(model: nn.Module) -> ArchSpec:
    """Look up the model's family; unknown or unfoldable variants raise with the supported list."""
    model_type = getattr(model.config, "model_type", None)
    for spec in ARCHS:
        if model_type in spec.model_types:
            if spec is OPT and not getattr(model.config, "do_layer_norm_before", True):
                raise EdgequantError(
                    "OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) cannot fold "
                    "scales into its layer norms"
                )
            return spec
    raise EdgequantError(
        f"unsupported architecture {type(model).__name__} (model_type {model_type!r}); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def blocks_of(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.blocks)


def fold_index(block: nn.Module, group: ScaleGroup, gqa: bool = True) -> torch.Tensor | None:
    """For each input channel of the group, the output channel of `prev` it comes from.

    Identity where prev produces the group's input as is. Under grouped-query attention
    v_proj is narrower than o_proj's input: each key/value head of head_dim channels feeds
    n_rep consecutive query heads, so one scale per v_proj channel repeats n_rep times on
    o_proj's input (gqa=False declines that fold). None where the widths fit neither way or
    the fold is declined (the group then keeps s = 1).
    """
    prev = block.get_submodule(group.prev)
    c_in = block.get_submodule(group.linears[0]).in_features
    if not isinstance(prev, nn.Linear) or prev.out_features == c_in:
        return torch.arange(c_in)
    c_prev = prev.out_features
    heads = block.get_submodule(group.heads) if gqa and group.heads else None
    hd = getattr(heads, "head_dim", None)
    if not hd or c_prev % hd or c_in % c_prev:
        return None
    kv, rep = c_prev // hd, c_in // c_prev
    return torch.arange(c_prev).view(kv, 1, hd).expand(kv, rep, hd).reshape(-1)


@torch.no_grad()
def fold_into_prev(prev: nn.Module, s: torch.Tensor, norm: str) -> None:
    """Divide the output of `prev` per channel by s (s: [C]); the group's weights take s."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        return
    w = prev.weight
    if norm == "rms_one_plus":
        w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
    else:
        w.div_(s.to(w.dtype))
        if norm == "layernorm" and getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
