"""FP / RTN / AWQ perplexity and quantization wall time on real models.

    python benchmarks/quality.py                      # fast AWQ, both models
    python benchmarks/quality.py --exact-only         # paper-exact AWQ search at W3 (slow)

Rows are merged into benchmarks/results/quality.json by (model, bits, group, method), so
runs can be split; benchmarks/results/quality.md is rendered from the JSON with the checks
of issue #2: AWQ beats RTN on every row and text, W3 AWQ closes at least half of the
RTN-to-FP gap, and the fast search is within 1% of the exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from edgequant.api import quantize_model
from edgequant.config import AWQConfig, CalibConfig, QuantConfig
from edgequant.data import evaluation_ids, get_source
from edgequant.evaluate import perplexity
from edgequant.io import atomic_write_text
from edgequant.zoo import load

RESULTS = Path(__file__).parent / "results"
CONFIGS = {"smollm2-135m": ((4, 64), (3, 64)), "gemma3-270m": ((4, 128), (3, 128))}
TEXTS = ("austen", "pydocs")


def key(r: dict) -> str:
    return f"{r['model']}|w{r['bits']}g{r['group_size']}|{r['method']}"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": {}}


def save(path: Path, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), render(results))


def run_model(name: str, args, results: dict, path: Path) -> None:
    model, tok = load(name)
    ids = {t: evaluation_ids(tok, get_source(t)) for t in TEXTS}
    calib = CalibConfig(n_samples=args.n_samples, seqlen=args.seqlen)

    def record(model, bits, group, method, seconds):
        ppl = {t: perplexity(model, tok, ids[t], 2048, args.max_windows).to_dict() for t in TEXTS}
        row = {
            "model": name,
            "bits": bits,
            "group_size": group,
            "method": method,
            "quant_seconds": round(seconds, 1),
            "ppl": ppl,
        }
        results["rows"][key(row)] = row
        save(path, results)
        print(f"{key(row)}: " + ", ".join(f"{t} {p['ppl']:.3f}" for t, p in ppl.items()))

    if not args.exact_only:
        record(model, 16, -1, "fp", 0.0)
    for bits, group in CONFIGS[name]:
        q = QuantConfig(bits, group, zero_point=True)
        methods = [("awq-exact", "awq", AWQConfig(search="exact"))] if bits == 3 else []
        if not args.exact_only:
            methods = [("rtn", "rtn", None), ("awq", "awq", AWQConfig())]
        for label, method, acfg in methods:
            model, tok = load(name)  # a fresh float model
            t0 = time.perf_counter()
            quantize_model(model, tok, method, quant=q, awq=acfg, calib=calib)
            record(model, bits, group, label, time.perf_counter() - t0)


def render(results: dict) -> str:
    rows = results["rows"]
    out = [
        "# Quality: FP / RTN / AWQ perplexity",
        "",
        results.get("protocol", ""),
        "",
        "| model | config | method | ppl austen | ppl pydocs (held out) | quant time (s) |",
        "|---|---|---|---|---|---|",
    ]
    checks = []
    for r in sorted(rows.values(), key=lambda r: (r["model"], -r["bits"], r["method"])):
        cfg = "fp" if r["method"] == "fp" else f"W{r['bits']} g{r['group_size']}"
        cells = " | ".join(f"{r['ppl'][t]['ppl']:.3f}" for t in TEXTS)
        out.append(f"| {r['model']} | {cfg} | {r['method']} | {cells} | {r['quant_seconds']} |")
        if r["method"] != "awq":
            continue
        fp = rows.get(f"{r['model']}|w16g-1|fp")
        rtn = rows.get(key({**r, "method": "rtn"}))
        exact = rows.get(key({**r, "method": "awq-exact"}))
        for t in TEXTS:
            a = r["ppl"][t]["ppl"]
            if rtn:
                b = rtn["ppl"][t]["ppl"]
                checks.append((f"{cfg} {r['model']} {t}: AWQ {a:.3f} < RTN {b:.3f}", a < b))
                if fp and r["bits"] == 3:
                    f = fp["ppl"][t]["ppl"]
                    closed = (b - a) / (b - f)
                    checks.append(
                        (
                            f"{cfg} {r['model']} {t}: AWQ closes {closed:.0%} of the "
                            f"RTN-FP gap (>= 50%)",
                            closed >= 0.5,
                        )
                    )
            if exact:
                e = exact["ppl"][t]["ppl"]
                rel = a / e - 1
                checks.append(
                    (
                        f"{cfg} {r['model']} {t}: fast {a:.3f} vs exact {e:.3f} "
                        f"({rel:+.2%}, within 1%)",
                        rel <= 0.01,
                    )
                )
    out += ["", "## Checks", ""]
    out += [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks]
    out += ["", f"Machine: {results.get('machine', '')}", ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--exact-only", action="store_true", help="only the exact-search W3 rows")
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = p.parse_args()
    results = load_results(args.out)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"commit {commit}"
    )
    results["protocol"] = (
        f"Perplexity: first {args.max_windows} non-overlapping 2048-token windows of each text "
        "(austen = Pride and Prejudice; pydocs = held-out reference/ and faq/), BOS prefix "
        "only where the tokenizer adds one. Calibration: pydocs library/tutorial/howto, "
        f"{args.n_samples} x {args.seqlen} tokens, seed 0. Asymmetric (zero-point) quantization. "
        "FP = the GGUF weights dequantized (they already sit on a 4-bit grid)."
    )
    for name in args.models.split(","):
        run_model(name, args, results, args.out)
    print(render(results))


if __name__ == "__main__":
    main()
