import json

import pytest
import torch
from conftest import FACTORIES

from edgequant.config import StaticConfig
from edgequant.errors import EdgequantError
from edgequant.static import Quantizers, observe_ranges, quantize_weights
from edgequant.static_checkpoint import load_static, save_static


def ids(n=4, t=16, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def static(arch, cfg):
    model = FACTORIES[arch]()
    quantize_weights(model, cfg)
    qs = Quantizers(model, cfg)
    observe_ranges(model, qs, ids())
    return model, qs


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("cfg", [StaticConfig(), StaticConfig(w_bits=4, w_symmetric=True)])
def test_round_trip_reproduces_logits(arch, cfg, tmp_path, tokenizer):
    model, qs = static(arch, cfg)
    x = ids(2, seed=3)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    save_static(model, qs, tokenizer, tmp_path / "ckpt")
    loaded, lqs = load_static(tmp_path / "ckpt")
    assert lqs.table() == qs.table()
    with torch.no_grad():
        out = loaded(x, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "edgequant-static" and qc["static"]["w_bits"] == cfg.w_bits


def test_bad_checkpoints_give_clear_errors(tmp_path, tokenizer):
    model, qs = static("llama", StaticConfig())
    save_static(model, qs, tokenizer, tmp_path / "ckpt")
    with pytest.raises(EdgequantError, match="already exists"):
        save_static(model, qs, tokenizer, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(EdgequantError, match="cannot read"):
        load_static(tmp_path / "ckpt")
    with pytest.raises(EdgequantError, match="unreadable config.json"):
        load_static(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EdgequantError, match="not an edgequant-static checkpoint"):
        load_static(tmp_path)
