"""Which fast objective picks the AWQ scale that the paper's loss picks, group by group.

    python benchmarks/awq_objective.py --model smollm2-135m --bits 3 --group 64

On the float model's own block inputs (--n-samples calibration samples of 512 tokens), for
every group of several linears (q/k/v into attention, gate/up into the MLP) and each of the
20 grid points alpha = i / 20: the paper's loss (MSE of the inspected module's output over
all samples, float32), the per-linear Gram error tr(D G D^T) on the same tokens, and the
module loss on k samples (whole chunks of 4, evenly spaced, as AWQConfig(loss_samples=k)
picks them; those chunks are among the paper loss's samples, 4 of 16 by default where the
search sees 4 of 128, which flatters module-k somewhat). Each objective picks its alpha; its
regret is the paper's loss at that alpha over the paper's minimum, minus 1. Each objective
also picks coarse to fine ("<objective>-coarseK", --coarse-step K: every K-th alpha, then
the step halved around the best; 10 of the 20 points for K = 4), which would halve the
search's cost if the curves were unimodal. Writes a table and
benchmarks/results/awq_objective.json, with every curve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgequant.api import _calibration
from edgequant.arch import arch_for, blocks_of
from edgequant.awq import _first, candidate_scale, chunk_subset, scaled_error
from edgequant.calibrate import capture_block_inputs
from edgequant.config import CalibConfig, QuantConfig
from edgequant.io import atomic_write_text
from edgequant.primitives import fake_quantize
from edgequant.zoo import load

RESULTS = Path(__file__).parent / "results" / "awq_objective.json"
CHUNK = 4  # samples per forward, as the search runs them


def coarse_pick(vals: list[float], step: int) -> int:
    """The grid index a coarse-to-fine search would pick on the curve `vals`: every step-th
    point and the last, then the step halved (rounding up) around the best point so far
    until it is 1; ties to the smaller index. On a strictly unimodal curve, the whole grid's
    pick."""
    n, seen = len(vals), set()

    def best() -> int:
        return min(sorted(seen), key=vals.__getitem__)

    seen.update([*range(0, n, step), n - 1])
    while step > 1:
        step = (step + 1) // 2
        b = best()
        seen.update(i for i in (b - step, b + step) if 0 <= i < n)
    return best()


def group_curves(block, group, hidden, kwargs, qcfg, n_grid, subsets) -> dict[str, list]:
    """Objective values over the alpha grid for one group; hidden [N, T, H] block inputs."""
    mod = block.get_submodule(group.inspect)
    lins = [block.get_submodule(n) for n in group.linears]
    xs, calls = [], []
    h1 = lins[0].register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    h2 = mod.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        for c in hidden.split(CHUNK):
            block(c, **kwargs)
    finally:
        h1.remove()
        h2.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
    gram, n = x.T @ x, x.shape[0]
    originals = [lin.weight.data for lin in lins]
    w_cat = torch.cat(originals)
    ref = [_first(mod(*a, **kw)) for a, kw in calls]
    curves: dict[str, list] = {"paper": [], "gram": [], **{f"module-{k}": [] for k in subsets}}
    for i in range(n_grid):
        s = candidate_scale(x.abs().mean(0), None, i / n_grid)
        for lin, w in zip(lins, originals, strict=True):
            lin.weight.data = fake_quantize(w * s, qcfg)[0] / s
        outs = [_first(mod(*a, **kw)) for a, kw in calls]
        errs = [(o - r).pow(2).mean().item() for o, r in zip(outs, ref, strict=True)]
        for lin, w in zip(lins, originals, strict=True):
            lin.weight.data = w
        curves["paper"].append(sum(errs) / len(errs))
        curves["gram"].append(scaled_error(w_cat, s, qcfg, gram, n))
        for k, pick in subsets.items():
            curves[f"module-{k}"].append(sum(errs[j] for j in pick) / len(pick))
    return curves


@torch.no_grad()
def measure(name: str, qcfg: QuantConfig, n_samples: int, ks: list[int], coarse: int) -> list:
    model, tok = load(name)
    model.float().eval()
    spec = arch_for(model)
    ids = _calibration(model, tok, CalibConfig(n_samples=n_samples))
    inputs = capture_block_inputs(model, spec, ids)
    hidden = inputs.hidden
    n_grid, n_chunks = 20, -(-n_samples // CHUNK)
    subsets = {k: chunk_subset(n_chunks, CHUNK, k) for k in ks}  # chunk indices, as the search
    rows = []
    for i, block in enumerate(blocks_of(model, spec)):
        kw = inputs.kwargs[i]
        for g in spec.groups:
            if len(g.linears) < 2:
                continue
            curves = group_curves(block, g, hidden, kw, qcfg, n_grid, subsets)
            paper = curves["paper"]
            row = {"block": i, "group": g.name}
            for obj, vals in curves.items():
                for label, step in {obj: 1, f"{obj}-coarse{coarse}": coarse}.items():
                    j = coarse_pick(vals, step)
                    row[label] = {"alpha": j / n_grid, "regret": paper[j] / min(paper) - 1}
            row["curves"] = curves
            rows.append(row)
            print(
                f"block {i:2d} {g.name:8s} "
                + "  ".join(f"{o} {row[o]['alpha']:.2f} ({row[o]['regret']:+.1%})" for o in curves),
                flush=True,
            )
        hidden = torch.cat([_first(block(c, **kw)) for c in hidden.split(CHUNK)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=16, help="calibration samples (512 tokens)")
    p.add_argument("--module-samples", default="4,8", help="k for the module-k objectives")
    p.add_argument("--coarse-step", type=int, default=4, help="also each objective's pick "
                   "when it scores the grid coarse to fine")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    ks = [int(k) for k in a.module_samples.split(",")]
    if a.coarse_step < 1:
        p.error("--coarse-step: 1 or more (1 scores the whole grid)")
    if a.n_samples % CHUNK or any(k % CHUNK for k in ks):
        p.error(f"--n-samples, --module-samples: multiples of {CHUNK} (whole chunks)")
    rows = measure(a.model, QuantConfig(a.bits, a.group), a.n_samples, ks, a.coarse_step)
    objectives = [o for o in rows[0] if o not in ("block", "group", "curves")]
    summary = {}
    for o in objectives:
        for g in sorted({r["group"] for r in rows}):
            regrets = [r[o]["regret"] for r in rows if r["group"] == g]
            summary[f"{o}|{g}"] = {
                "mean_regret": sum(regrets) / len(regrets),
                "max_regret": max(regrets),
                "same_alpha": sum(
                    r[o]["alpha"] == r["paper"]["alpha"] for r in rows if r["group"] == g
                )
                / len(regrets),
            }
    print(
        f"\n{'objective':17s} {'group':8s} {'mean regret':>12s} {'max regret':>11s} "
        f"{'same alpha':>10s}"
    )
    for k, v in summary.items():
        o, g = k.split("|")
        print(
            f"{o:17s} {g:8s} {v['mean_regret']:12.2%} {v['max_regret']:11.2%} "
            f"{v['same_alpha']:10.0%}"
        )
    results = json.loads(a.out.read_text()) if a.out.is_file() else {"runs": {}}
    results["runs"][f"{a.model}|w{a.bits}g{a.group}"] = {
        "model": a.model,
        "bits": a.bits,
        "group_size": a.group,
        "n_samples": a.n_samples,
        "protocol": "float model's block inputs; paper loss = module output MSE over all "
        "samples; regret = paper loss at the objective's alpha / paper minimum - 1",
        "summary": summary,
        "rows": rows,
    }
    atomic_write_text(a.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
