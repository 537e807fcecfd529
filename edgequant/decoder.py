"""A lean decoder for generation: fused projections, a preallocated KV cache, few ops per token.

Built from a loaded HF model (float, or with QuantLinear modules from a packed checkpoint) and
its architecture's DecodeSpec; the HF modules are only read, never called per token, except
the rotary embedding, which fills a cos/sin table once. q/k/v and gate/up run as one fused
linear each; quantized linears take the CPU kernels of edgequant.kernels.cpu (or the reference
kernel, the oracle); the tied embedding/lm_head is stored once, per-row int8 by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.arch import ARCHS, ArchSpec, arch_for, blocks_of
from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.kernels import cpu, engine
from edgequant.modules import QuantLinear, unsigned_codes
from edgequant.primitives import dequantize

KEY_BLOCK = 16  # positions per block of the key cache
KERNELS = ("cpu", "torch", "reference")  # cpu: the C++ extension where it loads, else torch
QUANT_BUFFERS = ("codes", "scale", "zero")
HEADS = ("int8", "int4", "bf16")
HEAD_INT4 = QuantConfig(4, 32)  # the int4 lm_head: asymmetric, groups of 32 (like GGUF Q4_0/1)
ACTIVATIONS = {  # HF config activation names -> the function (it may overwrite its input)
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def fused_linear(mods: list[nn.Module], kernel: str, dtype: torch.dtype, ext=None) -> nn.Module:
    """One module computing the concatenated outputs of linears that share an input.

    ext: the C++ extension where it loaded (kernel "cpu" then uses its int4 layout).
    """
    bias = [m.bias for m in mods]
    b = None
    if any(x is not None for x in bias):
        b = torch.cat(
            [
                torch.zeros(m.out_features) if x is None else x
                for x, m in zip(bias, mods, strict=True)
            ]
        )
    if all(isinstance(m, QuantLinear) for m in mods):
        cfg = mods[0].cfg
        if any(m.cfg != cfg for m in mods):
            raise EdgequantError("fused linears must share one quantization config")
        codes, scale, zero = (torch.cat([getattr(m, a) for m in mods]) for a in QUANT_BUFFERS)
        if kernel != "reference":
            return cpu.fast_linear(codes, scale, zero, cfg, b, ext)
        return cpu.ReferenceLinear(codes, scale, zero, cfg, b)
    if any(isinstance(m, QuantLinear) for m in mods):
        raise EdgequantError("cannot fuse quantized and float linears")
    return cpu.DenseLinear(torch.cat([m.weight.detach() for m in mods]), b, dtype)


class Layer(nn.Module):
    """One decoder block's weights, its KV cache and its attention window."""

    def __init__(self, block, spec: ArchSpec, cfg, idx: int, kernel: str, dtype, max_seq, ext):
        super().__init__()
        d = spec.decode
        get = block.get_submodule
        self.qkv = fused_linear([get(n) for n in d.qkv], kernel, dtype, ext)
        self.o = fused_linear([get(d.o)], kernel, dtype, ext)
        self.gate_up = fused_linear([get(n) for n in d.gate_up], kernel, dtype, ext)
        self.down = fused_linear([get(d.down)], kernel, dtype, ext)
        one_plus = spec.norm == "rms_one_plus"
        norms = {"attn_norm": d.attn_norm, "attn_post_norm": d.attn_post_norm}
        norms |= {"mlp_norm": d.mlp_norm, "mlp_post_norm": d.mlp_post_norm}
        qk = d.qk_norm or (None, None)
        norms |= {"q_norm": qk[0], "k_norm": qk[1]}
        for attr, path in norms.items():
            w = None if path is None else get(path).weight.detach().float()
            self.register_buffer(attr, None if w is None else (1.0 + w if one_plus else w))
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        types = getattr(cfg, "layer_types", None)
        self.layer_type = types[idx] if types else "full_attention"
        window = getattr(cfg, "sliding_window", None)
        self.window = window if self.layer_type == "sliding_attention" or not types else None
        scalar = getattr(cfg, d.attn_scale) if d.attn_scale else self.head_dim
        self.scale = scalar**-0.5
        # keys in blocks of 16 positions, [1, KV, S/16, hd, 16]: the C++ engine scores a block
        # per vector from one contiguous read; values [1, KV, S, hd]
        blocks = -(-max_seq // KEY_BLOCK)
        kshape = (1, self.kv_heads, blocks, self.head_dim, KEY_BLOCK)
        vshape = (1, self.kv_heads, blocks * KEY_BLOCK, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(kshape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(vshape, dtype=dtype), persistent=False)

    def write_keys(self, k: torch.Tensor, pos: int) -> None:
        # k [1, KV, T, hd] -> the key cache at positions pos..pos+T-1
        p = torch.arange(pos, pos + k.shape[2])
        self.k_cache[:, :, p // KEY_BLOCK, :, p % KEY_BLOCK] = k.permute(2, 0, 1, 3).to(
            self.k_cache.dtype
        )

    def keys(self, start: int, end: int) -> torch.Tensor:
        # -> [1, KV, end - start, hd] contiguous (a copy out of the blocked layout)
        b0, b1 = start // KEY_BLOCK, -(-end // KEY_BLOCK)
        blk = self.k_cache[:, :, b0:b1].transpose(-1, -2)  # [1, KV, nb, 16, hd]
        k = blk.reshape(1, self.kv_heads, -1, self.head_dim)
        return k[:, :, start - b0 * KEY_BLOCK : end - b0 * KEY_BLOCK]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, dtype=None) -> torch.Tensor:
    # x [..., D], w [D] float32 (already 1 + w for Gemma) -> [..., D] x.dtype
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(dtype or x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [1, H, T, hd], cos/sin [T, hd] -> [1, H, T, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Vocab(nn.Module):
    """Token embedding and output projection, one table when tied.

    mode int8: per-row int8; int4: 4-bit g32 rows in the int4 layout (needs the C++ extension,
    ext); bf16: dense. exact: the same table dequantized, float32 math for the reference path.
    """

    def __init__(self, emb, head, mode: str, dtype, scale: float, exact: bool = False, ext=None):
        super().__init__()
        self.scale, self.tied = scale, head is None
        w = emb if head is None else head
        if mode == "int4":
            if ext is None and not exact:
                raise EdgequantError(
                    "lm_head int4 needs the C++ extension (AVX512-BF16 and VNNI, a compiler)"
                )
            codes, sc, zero = unsigned_codes(w.float(), HEAD_INT4)
            self.head = (
                cpu.DenseLinear(dequantize(codes, sc, zero, HEAD_INT4), None, dtype)
                if exact
                else cpu.EngineInt4Linear.from_codes(codes, sc, zero, HEAD_INT4, ext)
            )
        elif mode == "int8":
            self.head = cpu.Int8Linear.from_float(w)
            if exact:  # the same int8 table, dequantized: float32 math for the reference path
                q = self.head
                self.head = cpu.DenseLinear(
                    q.qweight.float() * q.scale.float()[:, None], None, dtype
                )
        else:
            self.head = cpu.DenseLinear(w, None, dtype)
        self.register_buffer("table", None if self.tied else emb.to(dtype))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [1, T] -> [1, T, D] float32
        if not self.tied:
            x = F.embedding(ids, self.table).float()
        elif isinstance(self.head, cpu.Int8Linear):
            x = self.head.qweight[ids].float() * self.head.scale[ids].float().unsqueeze(-1)
        elif isinstance(self.head, cpu.EngineInt4Linear):
            x = self.head.rows(ids.reshape(-1)).view(*ids.shape, -1)
        else:
            x = F.embedding(ids, self.head.weight).float()
        return x * self.scale if self.scale != 1.0 else x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # h [..., D] float32 -> [..., V] float32
        return self.head(h)


class Decoder(nn.Module):
    """forward(ids [1, T], pos) appends T tokens at positions pos.. and returns the last logits.

    `dtype` is what the linears and attention compute in and the KV cache holds (bf16 for the
    fused kernels); the residual stream, norms, RoPE and logits stay float32.
    """

    def __init__(
        self, model, max_seq: int, kernel: str = "cpu", dtype=torch.bfloat16, lm_head: str = "int8"
    ):
        super().__init__()
        spec = arch_for(model)
        if spec.decode is None:
            raise EdgequantError(
                f"no lean decoder for {spec.name} models (generation supports: "
                + ", ".join(a.name for a in ARCHS if a.decode)
                + ")"
            )
        if kernel not in KERNELS or lm_head not in HEADS:
            raise EdgequantError(f"kernel must be one of {KERNELS}, lm_head one of {HEADS}")
        cfg, d = model.config, spec.decode
        self.config, self.dtype, self.eps = cfg, dtype, cfg.rms_norm_eps
        self.max_seq = min(max_seq, cfg.max_position_embeddings)
        act = getattr(cfg, d.act)
        if act not in ACTIVATIONS:
            raise EdgequantError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.ext = ext = engine.load() if kernel == "cpu" else None
        self.layers = nn.ModuleList(
            Layer(b, spec, cfg, i, kernel, dtype, self.max_seq, ext)
            for i, b in enumerate(blocks_of(model, spec))
        )
        emb = model.get_submodule(d.embed).weight.detach()
        out = model.get_output_embeddings()
        head = None if out is None or out.weight.data_ptr() == emb.data_ptr() else out.weight
        scale = math.sqrt(cfg.hidden_size) if d.embed_scale else 1.0
        head = None if head is None else head.detach()
        self.vocab = Vocab(emb, head, lm_head, dtype, scale, kernel == "reference", ext)
        w = model.get_submodule(d.final_norm).weight.detach().float()
        self.register_buffer("final_norm", 1.0 + w if spec.norm == "rms_one_plus" else w)
        self._rope_tables(model.get_submodule(d.rotary), d.rotary_takes_layer_type)
        self.engine = None if ext is None else build_engine(self, ext)

    def _rope_tables(self, rotary: nn.Module, per_type: bool) -> None:
        pos = torch.arange(self.max_seq).unsqueeze(0)
        x = torch.zeros(1, dtype=torch.float32)
        for t in sorted({layer.layer_type for layer in self.layers}):
            cos, sin = rotary(x, pos, t) if per_type else rotary(x, pos)
            self.register_buffer(f"cos_{t}", cos[0], persistent=False)
            self.register_buffer(f"sin_{t}", sin[0], persistent=False)

    def attention(self, layer: Layer, x: torch.Tensor, pos: int) -> torch.Tensor:
        # x [1, T, D] normed -> attention output [1, T, D]; writes k/v at pos..pos+T-1
        t, hd = x.shape[1], layer.head_dim
        qkv = layer.qkv(x).view(1, t, -1, hd).transpose(1, 2)  # [1, H + 2 KV, T, hd]
        q, k, v = qkv.split((layer.heads, layer.kv_heads, layer.kv_heads), dim=1)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
        rt = q.dtype if t > 1 else torch.float32  # a prompt: RoPE in the compute dtype
        cos = getattr(self, f"cos_{layer.layer_type}")[pos : pos + t].to(rt)
        sin = getattr(self, f"sin_{layer.layer_type}")[pos : pos + t].to(rt)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        end = pos + t
        layer.write_keys(k, pos)
        layer.v_cache[:, :, pos:end] = v
        start = 0 if layer.window is None else max(0, end - layer.window - t + 1)
        keys = layer.keys(start, end)
        values = layer.v_cache[:, :, start:end]
        dt = self.dtype if t > 1 else torch.float32  # one token: float32, as the engine computes
        q, keys, values = q.to(dt), keys.to(dt), values.to(dt)
        if pos == 0 and t > 1 and (layer.window is None or t <= layer.window):
            # a fresh prompt is plainly causal: the engine's kernel, or torch's fused flash one
            if self.ext is not None and dt == torch.bfloat16 and hd % 16 == 0:
                return layer.o(self.ext.prefill_attention(q, keys, values, layer.scale))
            o = F.scaled_dot_product_attention(
                q, keys, values, is_causal=True, scale=layer.scale, enable_gqa=True
            )
        else:
            mask = None
            if t > 1:
                qi = torch.arange(pos, end).unsqueeze(1)
                ki = torch.arange(start, end).unsqueeze(0)
                mask = ki <= qi
                if layer.window is not None:
                    mask &= ki > qi - layer.window
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=layer.scale, enable_gqa=True
            )
        return layer.o(o.transpose(1, 2).reshape(1, t, -1))

    def block(self, layer: Layer, x: torch.Tensor, pos: int) -> torch.Tensor:
        # x [1, T, D] residual stream -> [1, T, D]
        # linears and the MLP run in self.dtype; the residual stream x stays float32
        h = self.attention(layer, rms_norm(x, layer.attn_norm, self.eps, self.dtype), pos)
        if layer.attn_post_norm is not None:
            h = rms_norm(h, layer.attn_post_norm, self.eps)
        x = x + h
        normed = rms_norm(x, layer.mlp_norm, self.eps, self.dtype)
        gate, up = layer.gate_up(normed).chunk(2, dim=-1)
        h = layer.down(self.act(gate).mul_(up))  # in place: gate is a fresh buffer
        if layer.mlp_post_norm is not None:
            h = rms_norm(h, layer.mlp_post_norm, self.eps)
        return x + h

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        # ids [1, T] at positions pos..pos+T-1 -> logits [V] of the last one ([T, V] if all)
        if pos + ids.shape[1] > self.max_seq:
            raise EdgequantError(f"sequence longer than the cache ({self.max_seq} tokens)")
        if self.engine is not None and ids.shape[1] == 1 and not all_logits:
            return self.engine.step(int(ids[0, 0]), pos)
        x = self.vocab.embed(ids)
        for layer in self.layers:
            x = self.block(layer, x, pos)
        h = x[0] if all_logits else x[0, -1]
        logits = self.vocab.logits(rms_norm(h, self.final_norm, self.eps))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def build_engine(dec: Decoder, ext):
    """The C++ one-call-per-token engine over the decoder's own tensors (no copies), or None."""
    head = dec.vocab.head
    linears = [m for layer in dec.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    ok = all(isinstance(m, cpu.EngineInt4Linear) for m in linears) and dec.vocab.tied
    act = getattr(dec.config, "hidden_act", None) or getattr(dec.config, "hidden_activation", "")
    ok = ok and isinstance(head, cpu.Int8Linear | cpu.EngineInt4Linear)
    ok = ok and head.in_features % 64 == 0 and head.out_features % 4 == 0
    ok = ok and all(layer.head_dim % 16 == 0 for layer in dec.layers)
    if not ok or act not in ("silu", "gelu_pytorch_tanh"):
        return None
    eng = ext.Engine(dec.final_norm, dec.eps, dec.vocab.scale, dec.softcap or 0.0, act != "silu")
    if isinstance(head, cpu.Int8Linear):
        eng.set_head_i8(head.qweight, head.scale.float())
    else:
        eng.set_head_q4(*head.q4())
    for layer in dec.layers:
        lins = (layer.qkv, layer.o, layer.gate_up, layer.down)
        norms = [layer.attn_norm, layer.attn_post_norm, layer.mlp_norm, layer.mlp_post_norm]
        eng.add_layer(
            [t for m in lins for t in m.q4()[:3]],
            [m.group for m in lins],
            [m.bias for m in lins],
            [*norms, layer.q_norm, layer.k_norm],
            layer.k_cache,
            layer.v_cache,
            getattr(dec, f"cos_{layer.layer_type}"),
            getattr(dec, f"sin_{layer.layer_type}"),
            layer.heads,
            layer.kv_heads,
            layer.head_dim,
            layer.window or -1,
            layer.scale,
        )
    return eng
