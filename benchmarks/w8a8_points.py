"""Which static activation point costs what: integer-only quantization with one point of the
precision map left in float at a time.

    python benchmarks/w8a8_points.py --model smollm2-135m --method smoothquant --config w8a8

The model is quantized once (static RTN or SmoothQuant, weights on their static grids, ranges
observed on the calibration set); then perplexity is measured with every quantizer on, with
the weights alone (no activation quantizer), and with each point (e.g. "mlp.down_proj:in",
across every block) switched off in turn. Writes benchmarks/results/w8a8_points.json and
prints the table sorted by how much perplexity each point costs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from w8a8 import CONFIGS

from edgequant.api import quantize_static
from edgequant.config import CalibConfig
from edgequant.data import evaluation_ids, get_source
from edgequant.evaluate import perplexity
from edgequant.io import atomic_write_text
from edgequant.zoo import load

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="smoothquant", choices=("static-rtn", "smoothquant"))
    p.add_argument("--config", default="w8a8", choices=tuple(CONFIGS))
    p.add_argument("--text", default="austen")
    p.add_argument("--max-windows", type=int, default=1)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS / "w8a8_points.json")
    a = p.parse_args()
    model, tok = load(a.model)
    ids = evaluation_ids(tok, get_source(a.text))

    def ppl() -> float:
        return perplexity(model, tok, ids, 2048, a.max_windows, progress=False).ppl

    calib = CalibConfig(n_samples=a.n_samples)
    qs, _ = quantize_static(model, tok, a.method, CONFIGS[a.config], calib)
    points = sorted({q.name.split("/", 1)[1] for q in qs.quant.values()})
    rows = {"all": ppl()}
    with qs.mode("off"):
        rows["weights only"] = ppl()
    for point in points:
        off = [q for q in qs.quant.values() if q.name.split("/", 1)[1] == point]
        for q in off:
            q.mode = "off"
        rows[f"{point} off"] = ppl()
        for q in off:
            q.mode = "quant"
        print(f"{point} off: {rows[f'{point} off']:.3f}", flush=True)
    out = {"model": a.model, "method": a.method, "config": a.config, "text": a.text,
           "max_windows": a.max_windows, "ppl": rows}  # fmt: skip
    atomic_write_text(a.out, json.dumps(out, indent=2) + "\n")
    print(f"\n{a.model} {a.config} {a.method}, {a.text} ({a.max_windows} x 2048 tokens)")
    print("| quantizers | ppl | vs all on |\n|---|---|---|")
    for name, v in sorted(rows.items(), key=lambda kv: kv[1]):
        print(f"| {name} | {v:.3f} | {v / rows['all'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
