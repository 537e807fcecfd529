"""The lean loader: a packed checkpoint as a bare module tree gives the decoder HF's logits."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import gemma3, llama
from test_decoder import qwen3

from edgequant.bench import load_decoder
from edgequant.checkpoint import finalize, load_quantized, save_quantized
from edgequant.config import QuantConfig
from edgequant.decoder import Decoder
from edgequant.errors import EdgequantError
from edgequant.recipe import Recipe, apply_recipe
from edgequant.skeleton import NotLean, Rotary, load_skeleton

MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
MODELS = {
    "llama": llama,
    "qwen3": qwen3,
    "gemma3": lambda: gemma3(layers=3, layer_types=MIXED),
}


def packed(tmp_path, tokenizer, factory, q=None, fmt="awq"):
    q = q or QuantConfig(4, 32)
    model = factory()
    apply_recipe(model, Recipe(quant=q))
    finalize(model, q)
    save_quantized(model, tokenizer, tmp_path / "ckpt", q, fmt)
    return tmp_path / "ckpt"


def logits(model, ids):
    dec = Decoder(model, 64, kernel="reference", dtype=torch.float32, lm_head="bf16")
    return dec(ids, 0, all_logits=True)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("fmt,bits", [("awq", 4), ("compressed-tensors", 3), ("edgequant", 2)])
def test_skeleton_decodes_like_the_hf_model(tmp_path, tokenizer, arch, fmt, bits):
    path = packed(tmp_path, tokenizer, MODELS[arch], QuantConfig(bits, 32), fmt)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    lean = load_skeleton(path)
    assert isinstance(lean.config, SimpleNamespace)  # config.json as written, no HF class
    assert torch.equal(logits(lean, ids), logits(load_quantized(path), ids))


def test_incomplete_config_goes_through_autoconfig(tmp_path, tokenizer):
    path = packed(tmp_path, tokenizer, llama)
    raw = json.loads((path / "config.json").read_text())
    del raw["rope_parameters"]
    raw["rope_theta"] = 10000.0  # the pre-v5 spelling
    (path / "config.json").write_text(json.dumps(raw))
    lean = load_skeleton(path)
    assert type(lean.config).__name__ == "LlamaConfig"
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(lean, ids), logits(load_quantized(path), ids))


@pytest.mark.parametrize("arch", MODELS)
def test_rotary_tables_equal_hf(arch):
    model = MODELS[arch]()
    hf = model.model.rotary_emb
    ours = Rotary(model.config)
    pos, x = torch.arange(50).unsqueeze(0), torch.zeros(1)
    for t in sorted(set(getattr(model.config, "layer_types", None) or [None])):
        args = (x, pos) if t is None or arch != "gemma3" else (x, pos, t)
        for a, b in zip(ours(*args), hf(*args), strict=True):
            assert torch.equal(a, b)


def test_per_channel_edgequant_falls_back_to_the_full_loader(tmp_path, tokenizer):
    path = packed(tmp_path, tokenizer, llama, QuantConfig(8, -1), "edgequant")
    with pytest.raises(NotLean, match="ambiguous"):
        load_skeleton(path)
    dec, _ = load_decoder(str(path), 64, kernel="reference")
    ids = torch.randint(0, 320, (1, 8))
    ref = Decoder(load_quantized(path), 64, kernel="reference")(ids, 0)
    assert torch.equal(dec(ids, 0), ref)


def test_missing_tensor_is_a_clear_error(tmp_path, tokenizer):
    path = packed(tmp_path, tokenizer, llama)
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EdgequantError, match="down_proj.scales is missing"):
        load_skeleton(path)


def test_generation_process_imports_no_model_class_nor_sympy(tmp_path, tokenizer):
    path = packed(tmp_path, tokenizer, llama)
    code = (
        "import sys\n"
        "from edgequant.bench import load_decoder\n"
        f"dec, tok = load_decoder({str(path)!r}, 64)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.llama',"
        " 'torch.distributed.tensor', 'sympy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
