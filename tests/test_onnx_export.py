import collections

import pytest
import torch
from conftest import FACTORIES

from edgequant.config import StaticConfig
from edgequant.integer import to_integer
from edgequant.static import Quantizers, observe_ranges, quantize_weights

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgequant.onnx_export import block_inputs, export_block, export_mode, ort_session  # noqa: E402


def ids(n=4, t=16, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_block_runs_in_onnx_runtime_on_integer_matmuls(arch, w_bits, tmp_path):
    model = FACTORIES[arch]()
    cfg = StaticConfig(w_bits=w_bits)
    quantize_weights(model, cfg)
    qs = Quantizers(model, cfg)
    x = ids(1, seed=1)
    observe_ranges(model, qs, torch.cat([ids(), x]))  # ranges cover x: only rounding differs
    path = export_block(model, qs, 0, x, tmp_path / "block.onnx")
    sess = ort_session(path, tmp_path / "block.opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "block.opt.onnx").graph.node)
    assert ops["QLinearMatMul"] + ops["MatMulInteger"] + ops["MatMulIntegerToFloat"] >= 7
    inputs, kw = block_inputs(model, 0, x)
    feed = dict(zip(["hidden", "mask", "cos", "sin"], (t.numpy() for t in inputs), strict=True))
    out = torch.from_numpy(sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0])
    with export_mode(model, qs, 0) as block, torch.no_grad():
        rest = {k: v for k, v in kw.items() if k not in ("attention_mask", "position_embeddings")}
        ref = block(inputs[0], attention_mask=inputs[1], position_embeddings=inputs[2:], **rest)
        ref = ref[0] if isinstance(ref, tuple) else ref
    step = (ref.max() - ref.min()) / 255
    assert (out - ref).abs().max() <= step
    # and so does the integer simulation (our int8 matmuls), with the 16-bit points in float
    # as in the graph: rounding those moves an 8-bit code now and then (amplified downstream)
    to_integer(model, qs)
    for q in qs.quant.values():
        q.mode = "off" if q.bits == 16 else q.mode
    with torch.no_grad():
        sim = model.model.layers[0](
            inputs[0], attention_mask=inputs[1], position_embeddings=inputs[2:], **rest
        )
        sim = sim[0] if isinstance(sim, tuple) else sim
    assert (out - sim).abs().max() <= step
