"""Packed checkpoints: round trips, peers' decoders, and corrupt input."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FACTORIES

from edgequant.checkpoint import finalize, load_quantized, quantized_modules, save_quantized
from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.recipe import Recipe, apply_recipe

FORMATS_FOR_BITS = {
    2: ("edgequant", "compressed-tensors"),
    3: ("edgequant", "compressed-tensors"),
    4: ("awq", "compressed-tensors", "edgequant"),
    8: ("edgequant", "compressed-tensors"),
}


def quantized(arch, q, seed=0):
    model = FACTORIES[arch](hidden=128, seed=seed)
    apply_recipe(model, Recipe(quant=q))
    finalize(model, q)
    return model


def cases():
    for arch in FACTORIES:
        for bits, fmts in FORMATS_FOR_BITS.items():
            for group in (32, 64, 128, -1):
                for fmt in fmts:
                    if fmt == "awq" and group == -1:
                        continue
                    yield arch, bits, group, fmt


@pytest.mark.parametrize("arch,bits,group,fmt", list(cases()))
def test_roundtrip_reproduces_weights_and_logits(tmp_path, tokenizer, arch, bits, group, fmt):
    q = QuantConfig(bits, group, zero_point=(bits + group) % 2 == 0 or fmt == "awq")
    model = quantized(arch, q)
    save_quantized(model, tokenizer, tmp_path / "ckpt", q, fmt)
    loaded = load_quantized(tmp_path / "ckpt")
    mods = dict(loaded.named_modules())
    for name, lin in quantized_modules(model).items():
        assert torch.equal(mods[name].dequantized(), lin.dequantized()), name
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_awq_config_and_tensors(tmp_path, tokenizer):
    q = QuantConfig(4, 64)
    save_quantized(quantized("llama", q), tokenizer, tmp_path / "c", q, "awq")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                   "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
    from safetensors import safe_open

    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        sc = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    assert qw.dtype == torch.int32 and qw.shape == (256, 128 // 8)
    assert sc.dtype == torch.float16 and sc.shape == (256 // 64, 128)
    # independent decode of the file's qweight from the published layout: word (k, j) holds,
    # in nibble i, input row k of output column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]
    codes = quantized_modules(load_quantized(tmp_path / "c"))["model.layers.0.mlp.down_proj"].codes
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for k in (0, 77, 255):
        for j in (0, 9, 15):
            word = qw[k, j].item() & 0xFFFFFFFF
            for i in range(8):
                assert (word >> (4 * i)) & 0xF == codes[8 * j + order[i], k].item()
    assert torch.equal(
        sc.float().T, load_quantized(tmp_path / "c").model.layers[0].mlp.down_proj.scale
    )


# ---- a peer: compressed-tensors' own packing code (PyPI, runs on CPU) ----


def test_compressed_tensors_reads_our_packing(tmp_path, tokenizer):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from safetensors import safe_open

    for bits, group in ((4, 32), (3, 64), (8, 128)):
        q = QuantConfig(bits, group, zero_point=True)
        model = quantized("llama", q)
        out = tmp_path / f"ct{bits}"
        save_quantized(model, tokenizer, out, q, "compressed-tensors")
        name = "model.layers.1.self_attn.o_proj"
        lin = quantized_modules(model)[name]
        codes, scale, zero = lin.codes, lin.scale, lin.zero
        with safe_open(out / "model.safetensors", "pt") as f:
            packed = f.get_tensor(f"{name}.weight_packed")
            zp = f.get_tensor(f"{name}.weight_zero_point")
            shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
        # the peer's unpack gives signed values = our unsigned codes - 2^(bits-1)
        off = 2 ** (bits - 1)
        assert torch.equal(
            helpers.unpack_from_int32(packed, bits, shape).long(), codes.long() - off
        )
        ct_zp = helpers.unpack_from_int32(zp, bits, zero.shape, packed_dim=0)
        assert torch.equal(ct_zp.long(), zero.long() - off)
        # and the peer's dequantization formula gives our weights
        w = (
            codes.float() - off - (zero - off).repeat_interleave(group, 1)
        ) * scale.repeat_interleave(group, 1)
        assert torch.equal(w, lin.dequantized())


def test_checkpoint_packed_by_compressed_tensors_loads(tmp_path, tokenizer):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from safetensors.torch import load_file, save_file

    q = QuantConfig(4, 32)
    model = quantized("opt", q)
    out = tmp_path / "ct"
    save_quantized(model, tokenizer, out, q, "compressed-tensors")
    tensors = load_file(out / "model.safetensors")
    for name, lin in quantized_modules(model).items():  # re-pack every linear with peer code
        codes, zero = lin.codes, lin.zero
        signed = (codes.long() - 8).to(torch.int8)
        tensors[f"{name}.weight_packed"] = helpers.pack_to_int32(signed, 4)
        tensors[f"{name}.weight_zero_point"] = helpers.pack_to_int32(
            (zero.long() - 8).to(torch.int8), 4, packed_dim=0
        )
    os.remove(out / "model.safetensors")
    save_file(tensors, out / "model.safetensors")
    loaded = load_quantized(out)
    mods = dict(loaded.named_modules())
    for name, lin in quantized_modules(model).items():
        assert torch.equal(mods[name].dequantized(), lin.dequantized()), name


# ---- corrupt and partial checkpoints ----


@pytest.fixture
def ckpt(tmp_path, tokenizer, monkeypatch):
    import edgequant.checkpoint as ck

    monkeypatch.setattr(ck, "SHARD_BYTES", 200_000)  # several shards
    q = QuantConfig(4, 32)
    save_quantized(quantized("llama", q), tokenizer, tmp_path / "ck", q, "awq")
    return tmp_path / "ck"


def test_missing_shard(ckpt):
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(EdgequantError, match=f"{shard.name} is missing"):
        load_quantized(ckpt)


def test_truncated_shard(ckpt):
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgequantError, match=f"cannot read .*{shard.name}"):
        load_quantized(ckpt)


def test_wrong_tensor_shape(ckpt):
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.0.self_attn.q_proj.scales"
    shard = ckpt / index[key]
    t = load_file(shard)
    t[key] = t[key][:, :-8].contiguous()
    save_file(t, shard)
    with pytest.raises(EdgequantError, match=f"{shard.name}: tensor {key} has shape"):
        load_quantized(ckpt)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("quant_method", "bitsandbytes", "config.json: unknown quant_method 'bitsandbytes'"),
        ("bits", 3, "awq checkpoint .* 3 bits"),  # a bits/group combination awq cannot hold
        ("group_size", 48, "group size 48 does not divide in_features 128"),
    ],
)
def test_bad_quantization_config(ckpt, field, value, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgequantError, match=message):
        load_quantized(ckpt)


def test_save_refuses_layout_it_cannot_hold(tmp_path, tokenizer):
    q = QuantConfig(3, 32)
    with pytest.raises(EdgequantError, match="format awq holds 4-bit"):
        save_quantized(quantized("llama", q), tokenizer, tmp_path / "x", q, "awq")
    assert not any(tmp_path.iterdir())


def test_killed_writer_leaves_nothing_loadable(tmp_path):
    out = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import safetensors.torch as st
        import edgequant.checkpoint as ck
        from conftest import make_tokenizer, llama
        from edgequant.config import QuantConfig
        real = st.save_file
        def slow(*a, **k):
            real(*a, **k)
            print("wrote", flush=True)
            time.sleep(60)
        ck.save_file = slow
        q = QuantConfig(4, 32)
        ck.save_quantized(llama(hidden=128), make_tokenizer(), {str(out)!r}, q, "awq")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "wrote"  # killed in the middle of writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".ck.") for p in leftovers)
    for p in leftovers:
        with pytest.raises(EdgequantError):
            load_quantized(p)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (4, -1)])
def test_transformers_loads_our_compressed_tensors_checkpoint(tmp_path, tokenizer, bits, group):
    """transformers' own compressed-tensors path (pip compressed-tensors) gives our logits.

    Symmetric only: transformers 5.23 + compressed-tensors 0.20 allocate asymmetric zero
    points unpacked ([out, groups]) and reject, as a size mismatch, the packed-along-out
    zero points ([ceil(out*bits/32), groups]) that compressed-tensors' own compressor
    writes and vLLM reads; ours follow the compressor (see the two tests above).
    """
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    q = QuantConfig(bits, group, zero_point=False)
    model = quantized("llama", q)
    save_quantized(model, tokenizer, tmp_path / "ct", q, "compressed-tensors")
    peer = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, peer(ids).logits)
