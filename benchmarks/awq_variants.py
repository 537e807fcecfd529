"""AWQ search variants on one configuration: which knobs move perplexity.

    python benchmarks/awq_variants.py --variants default,duo,sym,noclip --bits 3 --group 64

Each variant quantizes a fresh float SmolLM2-135M (pydocs calibration, 128 x 512) and is
evaluated on the first --max-windows 2048-token windows of each --texts source (default:
Pride and Prejudice and the held-out pydocs reference/faq text). Writes
benchmarks/results/awq_variants.json and prints a table with the RTN and FP references.
Every variant but `ls4` scores q/k/v and gate/up by the Gram form (loss_samples=0, the
default at every width but 3 bits), and every fast variant scores down_proj on the
8192-token Gram sample (single_all_tokens=False), as its rows were measured; bf16 block
forwards where the device does them fast, so `fp32` equals `default` on a CPU without AVX512-BF16.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgequant.api import quantize_model
from edgequant.config import AWQConfig, CalibConfig, QuantConfig
from edgequant.data import evaluation_ids, get_source
from edgequant.evaluate import perplexity
from edgequant.io import atomic_write_text
from edgequant.zoo import load

# the rows here were measured with the Gram form at every width, down_proj on the sample
SAMPLED = {"single_all_tokens": False}
GRAM = {"loss_samples": 0, **SAMPLED}
VARIANTS = {
    "default": AWQConfig(**GRAM),
    "duo": AWQConfig(**GRAM, duo_scaling=True),
    "gqa": AWQConfig(**GRAM, gqa_fold=True),
    "sym": AWQConfig(**GRAM, clip_form="sym"),
    "noclip": AWQConfig(**GRAM, clip=False),
    "gram32k": AWQConfig(**GRAM, gram_tokens=32768),
    "clip8k": AWQConfig(**GRAM, clip_tokens=8192),
    "fp32": AWQConfig(**GRAM, bf16_matmul=False),
    "clipgrid40": AWQConfig(**GRAM, clip_grid=40),
    "ls4": AWQConfig(loss_samples=4, **SAMPLED),
    "exact": AWQConfig(search="exact"),
    "sens8": AWQConfig(sensitivity_samples=8),  # keeps down_proj on the sample by itself
    "sens32": AWQConfig(sensitivity_samples=32),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", default="default,duo,sym,noclip")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--texts", default="austen,pydocs")
    p.add_argument("--calib", default="pydocs", help="calibration text source")
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results/awq_variants.json")
    a = p.parse_args()
    q = QuantConfig(a.bits, a.group)
    model, tok = load(a.model)
    texts = a.texts.split(",")
    ids = {t: evaluation_ids(tok, get_source(t)) for t in texts}

    def ppl(m) -> dict[str, float]:
        return {
            t: perplexity(m, tok, ids[t], 2048, a.max_windows, progress=False).ppl for t in texts
        }

    rows = [{"variant": "fp", "ppl": ppl(model), "seconds": 0.0}]
    model, tok = load(a.model)
    quantize_model(model, tok, "rtn", quant=q)
    rows.append({"variant": "rtn", "ppl": ppl(model), "seconds": 0.0})
    for name in a.variants.split(","):
        model, tok = load(a.model)
        t0 = time.perf_counter()
        calib = CalibConfig(source=a.calib)
        quantize_model(model, tok, "awq", quant=q, awq=VARIANTS[name], calib=calib)
        rows.append({"variant": name, "ppl": ppl(model), "seconds": time.perf_counter() - t0})
        print(f"{name}: {rows[-1]['ppl']}", flush=True)
    fp, rtn = rows[0]["ppl"], rows[1]["ppl"]
    for r in rows:
        r["gap_closed"] = {t: (rtn[t] - r["ppl"][t]) / (rtn[t] - fp[t]) for t in texts}
    out = {"model": a.model, "bits": a.bits, "group_size": a.group, "texts": texts,
           "calib": a.calib,
           "max_windows": a.max_windows, "rows": rows}  # fmt: skip
    atomic_write_text(a.out, json.dumps(out, indent=2) + "\n")
    head = " | ".join(f"ppl {t} | gap closed {t}" for t in texts)
    print(f"| variant | {head} | quant s |\n|---|{'---|---|' * len(texts)}---|")
    for r in rows:
        cells = " | ".join(f"{r['ppl'][t]:.3f} | {r['gap_closed'][t]:.0%}" for t in texts)
        print(f"| {r['variant']} | {cells} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
