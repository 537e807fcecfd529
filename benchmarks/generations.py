"""Greedy generations of FP / RTN / AWQ side by side on a fixed prompt set.

    python benchmarks/generations.py [--model smollm2-135m --bits 3 --group 64]

Like the AWQ paper's qualitative figures: the same prompts, greedy decoding, --new-tokens
tokens from the float model and from its RTN and AWQ quantizations (asymmetric, pydocs
calibration 128 x 512). Writes benchmarks/results/generations.json, which `edgequant report`
shows as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgequant.api import quantize_model
from edgequant.config import QuantConfig
from edgequant.io import atomic_write_text
from edgequant.zoo import load

PROMPTS = (
    "It is a truth universally acknowledged that",
    "The main difference between a list and a tuple in Python is",
    "To read a file line by line in Python, you can",
    "The capital of France is",
    "Once upon a time, in a small village,",
)


def complete(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/generations.json")
    a = p.parse_args()
    q = QuantConfig(a.bits, a.group)
    outputs = {}
    for label in ("fp", "rtn", "awq"):
        model, tok = load(a.model)
        if label != "fp":
            quantize_model(model, tok, label, quant=q)
        name = label if label == "fp" else f"{label} W{a.bits} g{a.group}"
        outputs[name] = [complete(model, tok, pr, a.new_tokens) for pr in PROMPTS]
    gens = [{"prompt": pr, "outputs": {m: o[i] for m, o in outputs.items()}}
            for i, pr in enumerate(PROMPTS)]  # fmt: skip
    res = {"model": a.model, "protocol": f"greedy, {a.new_tokens} new tokens", "generations": gens}
    atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
    for g in gens:
        print(f"\n## {g['prompt']}")
        for m, text in g["outputs"].items():
            print(f"  [{m}] {text!r}")


if __name__ == "__main__":
    main()
