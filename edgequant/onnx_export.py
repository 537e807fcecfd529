"""Export decoder blocks of a static-quantized model to ONNX with QuantizeLinear /
DequantizeLinear pairs at our ranges, and run them in ONNX Runtime.

Every 8-bit point of the precision map becomes a uint8 QDQ pair with its static scale and
zero point; every block weight a constant int8 QDQ pair (per tensor, or per output channel)
holding exactly its codes. ONNX Runtime's CPU provider fuses QDQ around MatMul into integer
kernels (QLinearMatMul / MatMulInteger). The 16-bit points stay float in the graph: opset 17
QDQ is 8-bit only, and 16-bit rounding is below the 8-bit steps the outputs are compared at.
Needs the `onnx` extra (onnx, onnxruntime).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from edgequant.arch import arch_for, blocks_of
from edgequant.errors import EdgequantError
from edgequant.integer import grid_codes
from edgequant.static import Quantizers, weight_config


class QDQLinear(nn.Module):
    """A linear whose weight is its int8 codes behind a fake-quant (exported as QDQ).

    The weight is held transposed ([in, out]) so that the graph reads DQ(w) -> MatMul.
    """

    def __init__(self, lin: nn.Linear, bits: int, per_channel: bool):
        super().__init__()
        w = lin.weight.detach()
        rows = w if per_channel else w.reshape(1, -1)
        _, scale, zero = grid_codes(rows, bits)
        self.register_buffer("weight_t", w.t().contiguous())  # buffers: graph initializers
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias, self.per_channel = lin.bias, per_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]
        if self.per_channel:
            w = torch.fake_quantize_per_channel_affine(
                self.weight_t, self.scale, self.zero, 1, -128, 127
            )
        else:
            s, z = float(self.scale[0]), int(self.zero[0])
            w = torch.fake_quantize_per_tensor_affine(self.weight_t, s, z, -128, 127)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class BlockGraph(nn.Module):
    """One decoder block as a function of (hidden, attention mask, cos, sin)."""

    def __init__(self, block: nn.Module, kwargs: dict):
        super().__init__()
        self.block = block
        self.rest = {
            k: v for k, v in kwargs.items() if k not in ("attention_mask", "position_embeddings")
        }

    def forward(self, hidden, mask, cos, sin):
        out = self.block(hidden, attention_mask=mask, position_embeddings=(cos, sin), **self.rest)
        return out[0] if isinstance(out, tuple) else out


def block_inputs(model: nn.Module, i: int, ids: torch.Tensor) -> tuple[tuple, dict]:
    """Block i's (hidden, mask, cos, sin) and other keyword arguments for ids [1, T]."""
    block = blocks_of(model, arch_for(model))[i]
    cap: dict = {}

    def hook(module, args, kw):
        cap["hidden"] = args[0] if args else kw["hidden_states"]
        cap["kw"] = kw

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    kw = {k: v for k, v in cap["kw"].items() if k != "hidden_states"}
    cos, sin = kw["position_embeddings"]
    return (cap["hidden"], kw["attention_mask"], cos, sin), kw


@contextmanager
def export_mode(model: nn.Module, qs: Quantizers, i: int):
    """Block i's linears as QDQ linears and its quantizers in export form, then restored."""
    spec = arch_for(model)
    block = blocks_of(model, spec)[i]
    swapped = []
    try:
        for g in spec.groups:
            for name in g.linears:
                lin = block.get_submodule(name)
                qcfg, per_channel = weight_config(name, spec, qs.cfg)
                new = QDQLinear(lin, qcfg.bits, per_channel)
                new._forward_hooks = lin._forward_hooks
                new._forward_pre_hooks = lin._forward_pre_hooks
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, new)
                swapped.append((parent, leaf, lin))
        with qs.mode("export"):
            yield block
    finally:
        for parent, leaf, lin in swapped:
            setattr(block.get_submodule(parent), leaf, lin)


@contextmanager
def _float_block(model: nn.Module, qs: Quantizers, i: int):
    with qs.mode("off"):
        yield blocks_of(model, arch_for(model))[i]


def export_block(
    model: nn.Module, qs: Quantizers, i: int, ids: torch.Tensor, path: Path, quantized=True
) -> Path:
    """Write block i of a static-quantized model (quantizers attached) as ONNX (opset 17)
    for the prompt ids [1, T]; quantized=False writes the same block in float (quantizers
    off: the fp32 baseline, for a float model)."""
    inputs, kw = block_inputs(model, i, ids)
    ctx = export_mode(model, qs, i) if quantized else _float_block(model, qs, i)
    with ctx as block, torch.no_grad():
        torch.onnx.export(
            BlockGraph(block, kw),
            inputs,
            str(path),
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,  # keeps the weights' QDQ pairs for ONNX Runtime to fuse
            input_names=["hidden", "mask", "cos", "sin"],
            output_names=["out"],
        )
    return path


def ort_session(path: Path, optimized: Path | None = None, threads: int = 0):
    """An ONNX Runtime CPU session with every graph optimization (QDQ -> integer kernels)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgequantError("ONNX export needs: pip install 'edgequant[onnx]'") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}
