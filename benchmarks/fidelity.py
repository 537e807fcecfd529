"""Fidelity to the float model: mean KL and top-1 agreement of next-token distributions.

    python benchmarks/fidelity.py                                   # both models, W4 and W3
    python benchmarks/fidelity.py --models smollm2-135m --bits 3    # a slice

For RTN, AWQ, GPTQ and AWQ+GPTQ (asymmetric, SmolLM2-135M g64, Gemma-3-270M g128; pydocs
calibration 128 x 512) each quantized model is compared with its float model on the same
windows of each text (first --max-windows 2048-token windows): KL(float || quantized) in
nats per token, top-1 agreement and the perplexity ratio. Rows merge into
benchmarks/results/fidelity.json by (model, bits, group, method, text); fidelity.md is
rendered from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from provenance import measured_on, stamp
from quality import METHODS

from edgequant.api import quantize_model
from edgequant.config import CalibConfig, QuantConfig
from edgequant.data import evaluation_ids, get_source
from edgequant.evaluate import fidelity
from edgequant.io import atomic_write_text
from edgequant.zoo import load

RESULTS = Path(__file__).parent / "results"
GROUPS = {"smollm2-135m": 64, "gemma3-270m": 128}
LABELS = ("rtn", "awq", "gptq", "awq+gptq")
# W3 rows of earlier AWQ defaults: the Gram form, then the module loss on 4 samples
ORDER = LABELS + ("awq-ls4", "awq+gptq-ls4", "awq-gram", "awq+gptq-gram")


def key(r: dict) -> str:
    return f"{r['model']}|w{r['bits']}g{r['group_size']}|{r['method']}|{r['text']}"


def rank(method: str) -> int:
    return ORDER.index(method) if method in ORDER else len(ORDER)


def render(results: dict) -> str:
    rows = sorted(
        results["rows"].values(),
        key=lambda r: (r["model"], -r["bits"], r["text"], rank(r["method"]), r["method"]),
    )
    out = [
        "# Fidelity to the float model",
        "",
        "KL(float || quantized) of next-token distributions (nats per token, mean over "
        "scored tokens), how often both models' most likely next token agree, and the "
        f"perplexity ratio, on the same windows (first {results.get('max_windows', 8)} x 2048 "
        "tokens of each text; austen = "
        "Pride and Prejudice, pydocs = held-out reference/faq). Asymmetric weights, pydocs "
        "calibration 128 x 512. The float models are the GGUF weights dequantized (already on "
        "a 4-bit grid). Earlier W3 defaults of AWQ: `awq-gram`, `awq+gptq-gram` score its "
        "q/k/v and gate/up groups by the Gram form; `awq-ls4`, `awq+gptq-ls4` by the module "
        "loss on 4 samples, down_proj on an 8192-token Gram sample (today's W3 default: 32 "
        "samples, down_proj on every token).",
        "",
        "| model | config | text | method | KL | top-1 agreement | ppl ratio | quant s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fidelity"]
        out.append(
            f"| {r['model']} | W{r['bits']} g{r['group_size']} | {r['text']} | {r['method']} "
            f"| {f['kl']:.4f} | {f['top1']:.2%} | {f['ppl_ratio']:.3f} | {r['quant_seconds']} |"
        )
    out += ["", "## Measured on", "", *measured_on(rows)]
    return "\n".join(out) + "\n"


def save(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), render(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(GROUPS))
    p.add_argument("--bits", default="4,3")
    p.add_argument("--methods", default=",".join(LABELS))
    p.add_argument("--texts", default="austen,pydocs")
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--device", help="run on this torch device (e.g. cuda); default cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    a = p.parse_args()
    results = json.loads(a.out.read_text()) if a.out.is_file() else {"rows": {}}
    texts = a.texts.split(",")
    results["max_windows"] = a.max_windows
    where = stamp(a.device)
    for name in a.models.split(","):
        ref, tok = load(name, a.device)
        ids = {t: evaluation_ids(tok, get_source(t)) for t in texts}
        for bits in map(int, a.bits.split(",")):
            q = QuantConfig(bits, GROUPS[name], zero_point=True)
            for label in a.methods.split(","):
                method, acfg, gcfg = METHODS[label]
                model, _ = load(name, a.device)
                t0 = time.perf_counter()
                quantize_model(
                    model, tok, method, quant=q, awq=acfg, calib=CalibConfig(), gptq=gcfg
                )
                seconds = round(time.perf_counter() - t0, 1)
                for t in texts:
                    f = fidelity(model, ref, tok, ids[t], 2048, a.max_windows, progress=False)
                    row = {"model": name, "bits": bits, "group_size": GROUPS[name],
                           "method": label, "text": t, "quant_seconds": seconds,
                           "fidelity": f.to_dict()} | where  # fmt: skip
                    results["rows"][key(row)] = row
                    save(a.out, results)
                    print(f"{key(row)}: KL {f.kl:.4f} top-1 {f.top1:.2%} ppl x{f.ppl_ratio:.3f}")
    print(render(results))


if __name__ == "__main__":
    main()
