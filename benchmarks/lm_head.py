"""What the lm_head storage costs in quality: perplexity through the lean decoder per head mode.

    python benchmarks/lm_head.py [--model smollm2-135m] [--windows 4] [--window 1024]

Runs the W4 AWQ checkpoint that benchmarks/speed.py uses (made and cached there) through
edgequant's decoder (C++ engine kernels) with the tied embedding/lm_head stored as int8
(default), 4-bit g32 and bf16, on the first --windows windows of Pride and Prejudice (no BOS
prefix; next-token cross-entropy over each window). Writes benchmarks/results/lm_head.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch.nn.functional as F
from speed import w4_checkpoint

from edgequant.bench import load_decoder
from edgequant.data import evaluation_ids, get_source
from edgequant.decoder import HEADS
from edgequant.io import atomic_write_text


def head_perplexity(path: str, head: str, windows: int, window: int) -> float:
    dec, tok = load_decoder(path, window, lm_head=head)
    ids = evaluation_ids(tok, get_source("austen")).reshape(-1)
    nll, n = 0.0, 0
    for w in range(windows):
        x = ids[w * window : (w + 1) * window].unsqueeze(0)
        logits = dec(x, 0, all_logits=True)
        nll += F.cross_entropy(logits[:-1].float(), x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/lm_head.json")
    a = p.parse_args()
    path = str(w4_checkpoint(a.model))
    rows = {h: head_perplexity(path, h, a.windows, a.window) for h in HEADS}
    base = rows["bf16"]
    print("| lm_head | ppl austen | vs bf16 |\n|---|---|---|")
    for h, v in rows.items():
        print(f"| {h} | {v:.3f} | {v / base - 1:+.1%} |")
    res = {"model": a.model, "checkpoint": path, "windows": a.windows, "window": a.window}
    atomic_write_text(a.out, json.dumps(res | {"ppl": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
