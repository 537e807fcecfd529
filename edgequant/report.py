"""`edgequant report RESULTS... --out report.html`: benchmark JSON as one self-contained page.

Each input is recognised by its content, not its name: quality rows (perplexity per model,
config and method, optionally the AWQ search's per-block errors), speed rows (tokens per
second per runtime), fidelity rows (KL and top-1 agreement against the float model),
robustness rows (perplexity by calibration and evaluation text) and greedy generations.
Figures are drawn with matplotlib (Agg) and embedded as PNG; inputs a figure needs but that
were not given are listed at the end instead.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.io import atomic_write_text

# the methods drawn against bits: the paper's comparisons (search variants live in the tables)
METHOD_ORDER = ("rtn", "awq", "gptq", "gptq-act", "awq+gptq", "awq+gptq-act", "awq-exact")


def _kind(data: dict) -> str | None:
    rows = data.get("rows")
    if isinstance(data.get("generations"), list):
        return "generations"
    if not isinstance(rows, dict | list) or not rows:
        return None
    first = next(iter(rows.values())) if isinstance(rows, dict) else rows[0]
    if not isinstance(first, dict):
        return None
    if "fidelity" in first:
        return "fidelity"
    if "calib" in first and "eval" in first:
        return "robustness"
    if "ppl" in first and "config" in first:
        return "w8a8"
    if "ppl" in first and "bits" in first:
        return "quality"
    if any(isinstance(v, dict) and "decode_tok_s" in v for v in first.values()):
        return "speed"
    return None


def read_results(paths: list[str | os.PathLike]) -> dict[str, dict]:
    """{kind: data} from JSON files; unreadable or unrecognised files raise."""
    found: dict[str, dict] = {}
    source: dict[str, Path] = {}
    for p in map(Path, paths):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgequantError(f"cannot read results {p}: {e}") from None
        kind = _kind(data) if isinstance(data, dict) else None
        if kind is None:
            raise EdgequantError(f"{p}: not a benchmark result edgequant knows how to plot")
        if kind in found:
            raise EdgequantError(f"{p}: a second {kind} result after {source[kind]}; give one")
        found[kind], source[kind] = data, p
    return found


def _rows(data: dict) -> list[dict]:
    # rows that repeat another with a different AWQ search seed are left out of the plots
    rows = data["rows"]
    rows = list(rows.values()) if isinstance(rows, dict) else list(rows)
    return [r for r in rows if not r.get("seed")]


def _perplexity_vs_bits(data: dict, plt):
    rows = [r for r in _rows(data) if r["bits"] < 16]
    models = sorted({r["model"] for r in rows})
    texts = sorted({t for r in rows for t in r["ppl"]})
    fig, axes = plt.subplots(len(models), len(texts), figsize=(5 * len(texts), 3.6 * len(models)),
                             squeeze=False)  # fmt: skip
    for i, model in enumerate(models):
        main_group = max(r["group_size"] for r in rows if r["model"] == model)
        fp = next((r for r in _rows(data) if r["model"] == model and r["method"] == "fp"), None)
        for j, text in enumerate(texts):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["group_size"] == main_group]
            names = {r["method"] for r in sel}
            for m in (m for m in METHOD_ORDER if m in names):
                pts = sorted((r["bits"], r["ppl"][text]["ppl"]) for r in sel if r["method"] == m)
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
            if fp:
                ax.axhline(fp["ppl"][text]["ppl"], color="black", ls="--", lw=1, label="fp")
            ax.set_yscale("log")
            ax.set_xticks(sorted({r["bits"] for r in sel}))
            ax.set_xlabel("weight bits")
            ax.set_ylabel("perplexity (log)")
            ax.set_title(f"{model}, g{main_group}, {text}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _awq_blocks(data: dict, plt):
    rows = [r for r in _rows(data) if r.get("blocks") and r["method"] == "awq"]
    models = sorted({r["model"] for r in rows})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: -r["bits"]):
            blocks = [b["block"] for b in r["blocks"]]
            cut = [100 * (1 - b["awq_error"] / b["rtn_error"]) for b in r["blocks"]]
            ax.plot(blocks, cut, marker=".", label=f"W{r['bits']} g{r['group_size']}")
        ax.set_xlabel("block")
        ax.set_ylabel("output error removed vs RTN (%)")
        ax.set_title(f"{model}, AWQ")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _speed(data: dict, plt):
    groups = {k: v for k, v in data["rows"].items() if k.endswith("|2")} or data["rows"]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, (k, runtimes) in zip(axes[0], sorted(groups.items()), strict=True):
        names = list(runtimes)
        ax.barh(names, [runtimes[n]["decode_tok_s"] for n in names], color="tab:blue")
        ax.set_xlabel("decode tokens / s")
        model, threads = k.split("|")
        ax.set_title(f"{model}, {threads} threads")
    fig.tight_layout()
    return fig


def _fidelity(data: dict, plt):
    rows = _rows(data)
    keys = sorted({(r["model"], r["text"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, (model, text) in zip(axes[0], keys, strict=True):
        sel = [r for r in rows if r["model"] == model and r["text"] == text]
        labels = [f"{r['method']} W{r['bits']}" for r in sel]
        ax.barh(labels, [r["fidelity"]["kl"] for r in sel], color="tab:orange")
        ax.set_xlabel("KL(float || quantized), nats/token")
        ax.set_title(f"{model}, {text}")
    fig.tight_layout()
    return fig


def _w8a8(data: dict, plt):
    rows = [r for r in _rows(data) if r["method"] != "fp"]
    keys = sorted({(r["model"], t) for r in rows for t in r["ppl"]})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, (model, text) in zip(axes[0], keys, strict=True):
        best: dict[str, float] = {}  # "method config" -> its best row (settings dropped)
        for r in (r for r in rows if r["model"] == model):
            label = f"{r['method'].split()[0]} {r['config']}"
            best[label] = min(best.get(label, math.inf), r["ppl"][text]["ppl"])
        labels = sorted(best, key=lambda k: (k.split()[1], k))
        ax.barh(labels, [best[k] for k in labels], color="tab:purple")
        fp = data["rows"].get(f"{model}|fp|fp") if isinstance(data["rows"], dict) else None
        if fp:
            ax.axvline(fp["ppl"][text]["ppl"], color="black", ls="--", lw=1, label="fp")
            ax.legend(fontsize=7)
        ax.set_xlabel("perplexity")
        ax.set_title(f"{model}, {text}")
    fig.tight_layout()
    return fig


FULL_CALIB = 128  # calibration blocks of the distribution study (size-study rows say fewer)


def _panels(plt, n: int, width: float, height: float):
    """A figure of n panels, at most 4 per row (spare axes off): (figure, the n axes)."""
    ncols = min(n, 4)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat[:n]


def _robustness(data: dict, plt):
    rows = [r for r in _rows(data) if r.get("n_samples", FULL_CALIB) == FULL_CALIB]
    panels = sorted({(r["model"], r["method"], r["bits"]) for r in rows})
    fig, axes = _panels(plt, len(panels), 4.4, 3.4)
    for ax, (model, method, bits) in zip(axes, panels, strict=True):
        sel = [r for r in rows if (r["model"], r["method"], r["bits"]) == (model, method, bits)]
        calibs, evals = sorted({r["calib"] for r in sel}), sorted({r["eval"] for r in sel})
        grid = [[math.nan] * len(evals) for _ in calibs]
        for r in sel:
            grid[calibs.index(r["calib"])][evals.index(r["eval"])] = r["ppl"]
        im = ax.imshow(grid, cmap="viridis")
        lo, hi = im.get_clim()
        for a, row in enumerate(grid):
            for b, v in enumerate(row):
                light = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis turns yellow
                color = "black" if light else "white"
                ax.text(b, a, f"{v:.1f}", ha="center", va="center", color=color, fontsize=9)
        ax.set_xticks(range(len(evals)), evals)
        ax.set_yticks(range(len(calibs)), calibs)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("calibrated on")
        ax.set_title(f"{model} {method} W{bits}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def _robustness_size(data: dict, plt):
    rows = [r for r in _rows(data) if r["calib"] == "pydocs"]
    studied = {
        (r["model"], r["bits"]) for r in rows if r.get("n_samples", FULL_CALIB) != FULL_CALIB
    }
    panels = sorted(
        {(r["model"], r["bits"], r["eval"]) for r in rows if (r["model"], r["bits"]) in studied}
    )
    if not panels:
        return None
    fig, axes = _panels(plt, len(panels), 3.8, 3.2)
    for ax, (model, bits, text) in zip(axes, panels, strict=True):
        sel = [r for r in rows if (r["model"], r["bits"], r["eval"]) == (model, bits, text)]
        for method in sorted({r["method"] for r in sel}):
            pts = [(r.get("n_samples", FULL_CALIB), r["ppl"]) for r in sel if r["method"] == method]
            pts.sort()
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        sizes = sorted({r.get("n_samples", FULL_CALIB) for r in sel})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("calibration blocks (x 512 tokens)")
        ax.set_ylabel(f"perplexity ({text})")
        ax.set_title(f"{model} W{bits}, evaluated on {text}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


FIGURES: dict[str, tuple[str, str, Callable]] = {  # id -> (input kind, caption, drawer)
    "perplexity-vs-bits": ("quality", "Perplexity vs weight bits, per method", _perplexity_vs_bits),
    "awq-block-error": ("quality", "Per-block output error removed by the AWQ search", _awq_blocks),
    "speed": ("speed", "Decode speed per runtime (2 threads)", _speed),
    "fidelity": ("fidelity", "KL divergence from the float model", _fidelity),
    "robustness": ("robustness", "Perplexity by calibration and evaluation text", _robustness),
    "robustness-size": (
        "robustness",
        "Perplexity vs calibration-set size (pydocs calibration)",
        _robustness_size,
    ),
    "w8a8": ("w8a8", "Integer-only W8A8 / W4A8 perplexity, best run per method", _w8a8),
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _generations(data: dict) -> str:
    gens = data["generations"]
    labels = list(gens[0]["outputs"])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in labels)
    body = "".join(
        f"<tr><td><b>{html.escape(g['prompt'])}</b></td>"
        + "".join(f"<td>{html.escape(g['outputs'][m])}</td>" for m in labels)
        + "</tr>"
        for g in gens
    )
    return f"<table><tr><th>prompt</th>{head}</tr>{body}</table>"


def render(results: dict[str, dict]) -> tuple[str, list[str]]:
    """(HTML page, ids of the figures drawn)."""
    try:
        import matplotlib
    except ImportError:
        raise EdgequantError("reports need matplotlib: pip install 'edgequant[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts, drawn, missing = [], [], []
    for fid, (kind, caption, draw) in FIGURES.items():
        if kind not in results:
            missing.append(f"{caption} (needs {kind} results)")
            continue
        fig = draw(results[kind], plt)
        if fig is None:
            missing.append(f"{caption} (the {kind} results hold no data for it)")
            continue
        parts.append(
            f'<figure id="{fid}"><figcaption>{html.escape(caption)}</figcaption>'
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{_png(fig)}"></figure>'
        )
        plt.close(fig)
        drawn.append(fid)
    if "generations" in results:
        parts.append(
            f'<h2 id="generations">Greedy generations</h2>{_generations(results["generations"])}'
        )
        drawn.append("generations")
    if missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in missing)
        parts.append(f"<h2>Not shown</h2><ul>{items}</ul>")
    style = (
        "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%}figure{margin:0 0 2em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top}figcaption{font-weight:bold;font-size:1.2em;margin:1em 0 .5em}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>edgequant report</title>"
        f"<style>{style}</style></head><body><h1>edgequant report</h1>{''.join(parts)}"
        "</body></html>"
    )
    return page, drawn


def write_report(paths: list[str | os.PathLike], out: str | os.PathLike) -> list[str]:
    """Render the results at `paths` into the HTML file `out` (atomically); returns figure ids."""
    page, drawn = render(read_results(paths))
    atomic_write_text(Path(out), page)
    return drawn
