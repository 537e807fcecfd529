"""Bits per weight on disk for the quantized linears of real models.

    python benchmarks/size.py

RTN-quantizes each model (the layout's size does not depend on the search), writes packed
checkpoints in each format, and counts the bytes of every tensor that belongs to a quantized
linear (codes, scales, zeros, shape) against the number of weights they hold. Writes
benchmarks/results/size.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from safetensors import safe_open

from edgequant.api import quantize_model
from edgequant.checkpoint import quantized_modules, save_quantized
from edgequant.config import QuantConfig
from edgequant.io import atomic_write_text
from edgequant.zoo import load

CONFIGS = (
    ((4, 64), ("awq", "compressed-tensors")),
    ((4, 128), ("awq", "compressed-tensors")),
    ((3, 64), ("edgequant", "compressed-tensors")),
    ((3, 128), ("edgequant", "compressed-tensors")),
)
LIMITS = {(4, 128): 4.3, (3, 128): 3.3}


def linear_bits(ckpt: Path, names: list[str]) -> tuple[int, int]:
    """(bytes of the quantized linears' tensors, total bytes) in a checkpoint directory."""
    prefixes = tuple(f"{n}." for n in names)
    linear, total = 0, 0
    for file in sorted(ckpt.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * {"I32": 4, "F16": 2, "F32": 4, "I64": 8, "BF16": 2}[sl.get_dtype()]
                total += nbytes
                if key.startswith(prefixes) and not key.endswith(".bias"):
                    linear += nbytes
    return linear, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/size.json")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        model, tok = load(name)
        mods = quantized_modules(model)
        n_weights = sum(m.weight.numel() for m in mods.values())
        for (bits, group), formats in CONFIGS:
            q = QuantConfig(bits, group)
            widths = sorted({m.in_features for m in mods.values()})
            if any(w % group for w in widths):
                why = f"group {group} does not divide in_features {widths}"
                rows.append({"model": name, "bits": bits, "group_size": group, "skipped": why})
                print(f"{name} W{bits} g{group}: skipped, {why}")
                continue
            model, tok = load(name)
            quantize_model(model, tok, "rtn", quant=q)
            for fmt in formats:
                with tempfile.TemporaryDirectory() as tmp:
                    save_quantized(model, tok, Path(tmp) / "ckpt", q, fmt)
                    linear, total = linear_bits(Path(tmp) / "ckpt", list(mods))
                limit = LIMITS.get((bits, group))
                bpw = 8 * linear / n_weights
                rows.append({"model": name, "bits": bits, "group_size": group, "format": fmt,
                             "bits_per_weight": round(bpw, 4), "limit": limit,
                             "within_limit": None if limit is None else bpw <= limit,
                             "quantized_weights": n_weights, "linear_bytes": linear,
                             "checkpoint_bytes": total})  # fmt: skip
                print(f"{name} W{bits} g{group} {fmt}: {bpw:.3f} bits/weight")
    atomic_write_text(args.out, json.dumps({"rows": rows}, indent=2) + "\n")
    print("\n| model | config | format | bits/weight | limit | checkpoint MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            cfg = f"W{r['bits']} g{r['group_size']}"
            print(f"| {r['model']} | {cfg} | - | n/a ({r['skipped']}) | | |")
            continue
        lim = "" if r["limit"] is None else f"<= {r['limit']}"
        mb = r["checkpoint_bytes"] / 2**20
        cfg = f"W{r['bits']} g{r['group_size']}"
        bpw = r["bits_per_weight"]
        print(f"| {r['model']} | {cfg} | {r['format']} | {bpw:.3f} | {lim} | {mb:.1f} |")


if __name__ == "__main__":
    main()
