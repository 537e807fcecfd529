"""Atomic file and directory writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgequant.errors import EdgequantError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model, tokenizer, out: Path, recipe=None) -> None:
    """Write a (fake-quantized) model directory; it appears only when complete."""
    if out.exists():
        raise EdgequantError(f"output directory {out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if recipe is not None:
            recipe.save(tmp / "edgequant_recipe.safetensors")
            meta = {
                "method": recipe.method,
                "bits": recipe.quant.bits,
                "group_size": recipe.quant.group_size,
                "zero_point": recipe.quant.zero_point,
                "weights": "fake-quantized float32 (dequantized values)",
            }
            (tmp / "edgequant.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
