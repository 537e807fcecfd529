"""Device side: rebuild each bundled model (checking every tensor's sha256), run the AWQ
searches named in $JOBS on the GPU, save each recipe under $OUT as soon as it is done.

    JOBS='[["smollm2-135m", 3, 64, {"search": "exact"}, "exact"]]' \
        python3 benchmarks/device/remote.py BUNDLE_DIR
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from edgequant.awq import awq_quantize
from edgequant.config import AWQConfig, QuantConfig


def permute_back(w, n_head):
    dim1, dim2 = w.shape
    return w.reshape(n_head, dim1 // n_head // 2, 2, dim2).swapaxes(1, 2).reshape(dim1, dim2)


def build(name: str, root: str):
    d = os.path.join(root, name)
    blob = Path(d, "blob.bin").read_bytes()
    manifest = json.loads(Path(d, "manifest.json").read_text())
    state = load_file(os.path.join(d, "extras.safetensors"))
    ids = state.pop("calib_ids").long()
    for m in manifest:
        raw = np.frombuffer(blob, np.uint8, m["nbytes"], m["offset"]).reshape(m["raw_shape"])
        y = dequantize(raw, m["qtype"]).astype(np.float32).reshape(m["shape"])
        if m["transform"].startswith("perm"):
            y = permute_back(y, int(m["transform"][4:]))
        y = np.ascontiguousarray(y)
        if hashlib.sha256(y.tobytes()).hexdigest() != m["sha256"]:
            raise SystemExit(f"{name}: {m['name']} differs from the converted model")
        state[m["name"]] = torch.from_numpy(y.copy())
    cfg = AutoConfig.from_pretrained(d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    dev = os.environ.get("DEV", "cuda")
    return model.to(dev).eval(), ids.to(dev)


if __name__ == "__main__":
    root, out = sys.argv[1], os.environ["OUT"]
    jobs = json.loads(os.environ["JOBS"])  # [[model, bits, group, {AWQConfig fields}, tag]]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, bits, group, kw, tag in jobs:
        t0 = time.perf_counter()
        model, ids = build(name, root)
        print(f"{name}: built and verified in {time.perf_counter() - t0:.1f} s", flush=True)
        recipe = awq_quantize(model, ids, QuantConfig(bits, group), AWQConfig(**kw))
        recipe.save(os.path.join(out, f"{name}-w{bits}g{group}-{tag}.safetensors"))
        print(f"{name} W{bits} {kw}: {recipe.searched_on}", flush=True)
        del model
        torch.cuda.empty_cache()
