"""Command line: `edgequant quantize | eval | compare | generate | chat | bench | report`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgequant.cli_run import _add_run, cmd_bench, cmd_chat, cmd_generate
from edgequant.cli_static import add_static_args, cmd_quantize_static
from edgequant.config import STATIC_METHODS
from edgequant.errors import EdgequantError


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model (weight-only or integer-only)")
    p.add_argument("model", help="zoo name (smollm2-135m, gemma3-270m), model directory or hub id")
    methods = ("rtn", "awq", "gptq", "awq+gptq", *STATIC_METHODS)
    p.add_argument("--method", choices=methods, default="awq")
    p.add_argument("--w-bits", type=int, help="default 4 (weight-only), 8 (integer-only)")
    p.add_argument("--group-size", type=int, default=128, help="-1 for per-channel")
    zp = p.add_mutually_exclusive_group()
    zp.add_argument("--zero-point", dest="zero_point", action="store_true", default=True)
    zp.add_argument("--symmetric", dest="zero_point", action="store_false")
    p.add_argument(
        "--calib", default="pydocs", help="pydocs, austen[:novel], wikitext2, pileval or a file"
    )
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--search",
        choices=("fast", "exact"),
        default="fast",
        help="AWQ fast: second-order per-linear loss (at 3 bits q/k/v and gate/up by the module "
        "output on --loss-samples, down_proj on every token), bf16 matmuls where the device "
        "does them fast; exact: paper loss on all tokens in float32. GPTQ fast: bf16 block "
        "forwards and X^T X where the device does them fast; exact: float32",
    )
    p.add_argument("--duo-scaling", action="store_true", help="s = x^a / w^(1-a) (peers' default)")
    p.add_argument("--no-clip", dest="clip", action="store_false")
    p.add_argument("--clip-form", choices=("asym", "sym"), default="asym")
    p.add_argument(
        "--clip-all",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip q/k too (default; --no-clip-all skips them as the published search does)",
    )
    p.add_argument(
        "--loss-samples",
        type=int,
        default=None,
        metavar="N",
        help="AWQ fast search: score q/k/v and gate/up by the inspected module's output on N "
        "calibration samples; 0 is the Gram form (default: 32 at 3 bits, else 0)",
    )
    p.add_argument(
        "--single-all-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="AWQ fast search: score single-linear groups (down_proj) on every calibration "
        "token, not on an 8192-token sample (default: on at 3 bits, else off)",
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing diag(H)")
    p.add_argument(
        "--damp", type=float, default=0.01, help="GPTQ: dampening, fraction of mean diag"
    )
    p.add_argument("--save-search", metavar="FILE", help="write the searched scales and clips")
    p.add_argument(
        "--load-search", metavar="FILE", help="apply a saved search instead of searching"
    )
    p.add_argument("--out", metavar="DIR", help="write a packed checkpoint")
    p.add_argument(
        "--format",
        choices=("awq", "compressed-tensors", "edgequant"),
        help="checkpoint layout (default: awq for 4-bit zero-point grouped, else edgequant)",
    )
    p.add_argument("--ppl", metavar="TEXT", help="evaluate perplexity afterwards on this text")
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json", metavar="FILE", help="write a JSON summary")
    add_static_args(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, fidelity or lm-eval tasks of a model")
    p.add_argument("model")
    p.add_argument(
        "--ppl", metavar="TEXT", help="perplexity text source (default austen without --tasks)"
    )
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--limit", type=int, help="lm-eval: at most this many documents per task")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--max-windows", type=int)
    p.add_argument(
        "--compare-to",
        metavar="MODEL",
        help="also report mean KL divergence, top-1 agreement and perplexity ratio against "
        "this (float) model on the same windows",
    )
    p.add_argument("--json", metavar="FILE")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="FP vs RTN vs AWQ perplexity table on one model")
    p.add_argument("model")
    p.add_argument("--methods", default="rtn,awq")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", dest="zero_point", action="store_false")
    p.add_argument("--calib", default="pydocs")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl", default="austen", help="comma-separated text sources")
    p.add_argument("--max-windows", type=int)
    p.add_argument("--json", metavar="FILE")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="an HTML report with figures from benchmark JSON files")
    p.add_argument("results", nargs="+", help="quality / speed / fidelity / robustness JSON")
    p.add_argument("--out", default="report.html")


def cmd_report(a) -> None:
    from edgequant.report import write_report

    drawn = write_report(a.results, a.out)
    print(f"wrote {a.out}: {', '.join(drawn) or 'no figures'}")


def cmd_compare(a) -> dict:
    from edgequant.api import compare, table
    from edgequant.config import CalibConfig, QuantConfig

    qcfg = QuantConfig(bits=a.w_bits, group_size=a.group_size, zero_point=a.zero_point)
    ccfg = CalibConfig(source=a.calib, n_samples=a.n_samples, seqlen=a.seqlen)
    rows = compare(
        a.model,
        tuple(a.methods.split(",")),
        tuple(a.ppl.split(",")),
        a.max_windows,
        quant=qcfg,
        calib=ccfg,
    )
    print(f"\n{a.model}  w{qcfg.bits} g{qcfg.group_size}\n")
    print(table(rows))
    print(f"\nprotocol: {next(iter(rows[0].ppl.values())).protocol}")
    summary = {
        "model": a.model,
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "rows": [
            {
                "method": r.method,
                "seconds": r.seconds,
                "ppl": {t: p.to_dict() for t, p in r.ppl.items()},
            }
            for r in rows
        ],
    }
    if a.json:
        _write_json(a.json, summary)
    return summary


def _write_json(path: str, data: dict) -> None:
    from edgequant.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def cmd_quantize(a) -> dict:
    a.w_bits = a.w_bits or (8 if a.method in STATIC_METHODS else 4)
    if a.method in STATIC_METHODS:
        return _summarize(a, *cmd_quantize_static(a))
    from edgequant.api import quantize
    from edgequant.config import AWQConfig, CalibConfig, QuantConfig

    qcfg = QuantConfig(bits=a.w_bits, group_size=a.group_size, zero_point=a.zero_point)
    acfg = AWQConfig(
        search=a.search,
        duo_scaling=a.duo_scaling,
        clip=a.clip,
        clip_form=a.clip_form,
        clip_all=a.clip_all,
        loss_samples=a.loss_samples,
        single_all_tokens=a.single_all_tokens,
    )
    ccfg = CalibConfig(source=a.calib, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed)
    from edgequant.formats import check_format, default_format

    fmt = a.format or default_format(qcfg)
    if a.out:
        check_format(fmt, qcfg)
        if Path(a.out).exists():
            raise EdgequantError(f"output directory {a.out} already exists")
    t0 = time.perf_counter()
    from edgequant.gptq import GPTQConfig

    fast = a.search == "fast"
    bf16 = None if fast else False  # None: where the device does bf16 fast
    gcfg = GPTQConfig(damp=a.damp, act_order=a.act_order, bf16_matmul=bf16, bf16_hessian=bf16)
    model, tok, recipe = quantize(
        a.model, a.method, quant=qcfg, awq=acfg, calib=ccfg, load_search=a.load_search, gptq=gcfg
    )
    seconds = time.perf_counter() - t0
    what = f"{recipe.method} w{qcfg.bits} g{qcfg.group_size}"
    print(f"quantized {a.model} with {what} in {seconds:.1f} s")
    if recipe.fallbacks:
        print(f"identity-scale fallbacks: {', '.join(recipe.fallbacks)}")
    if a.save_search:
        recipe.save(a.save_search)
        print(f"search saved to {a.save_search}")
    if a.out:
        from edgequant.checkpoint import save_quantized

        save_quantized(model, tok, Path(a.out), recipe.quant, fmt)
        print(f"{fmt} checkpoint written to {a.out}")
    summary = {
        "model": a.model,
        "method": recipe.method,
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "zero_point": qcfg.zero_point,
        "seconds": seconds,
    }
    return _summarize(a, model, tok, summary)


def _summarize(a, model, tok, summary: dict) -> dict:
    """--ppl and --json of `quantize`, whichever method ran."""
    if a.ppl:
        summary["perplexity"] = _ppl(model, tok, a.ppl, 2048, a.max_windows)
    if a.json:
        _write_json(a.json, summary)
    return summary


def _ppl(model, tok, text: str, window: int, max_windows) -> dict:
    from edgequant.data import evaluation_ids, get_source
    from edgequant.evaluate import perplexity

    res = perplexity(model, tok, evaluation_ids(tok, get_source(text)), window, max_windows)
    print(f"perplexity on {text}: {res.ppl:.3f}  [{res.protocol}]")
    return {"text": text, **res.to_dict()}


def cmd_eval(a) -> dict:
    from edgequant.zoo import load

    summary, out = {"model": a.model}, {"model": a.model}
    if a.ppl or a.compare_to or not a.tasks:
        a.ppl = a.ppl or "austen"
        model, tok = load(a.model)
        summary["perplexity"] = _ppl(model, tok, a.ppl, a.window, a.max_windows)
        out |= summary["perplexity"]
        if a.compare_to:
            out["fidelity"] = summary["fidelity"] = _fidelity(model, tok, a)
        del model
    if a.tasks:
        out["tasks"] = summary["tasks"] = _tasks(a)
    if a.json:
        _write_json(a.json, out)
    return summary


def _tasks(a) -> dict:
    from edgequant.harness import evaluate

    tasks = [t for t in a.tasks.split(",") if t]
    res = evaluate(a.model, tasks, a.include_path, a.limit)["results"]
    for task, metrics in res.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    return res


def _fidelity(model, tok, a) -> dict:
    from edgequant.data import evaluation_ids, get_source
    from edgequant.evaluate import fidelity
    from edgequant.zoo import load

    ref, ref_tok = load(a.compare_to)
    if ref_tok.get_vocab() != tok.get_vocab():
        raise EdgequantError(f"{a.compare_to} has a different vocabulary than {a.model}")
    ids = evaluation_ids(tok, get_source(a.ppl))
    res = fidelity(model, ref, tok, ids, a.window, a.max_windows)
    print(
        f"against {a.compare_to}: KL {res.kl:.4f} nats/token, top-1 agreement {res.top1:.1%}, "
        f"perplexity ratio {res.ppl_ratio:.3f}  [{res.protocol}]"
    )
    return {"reference": a.compare_to, **res.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgequant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_run(sub)
    _add_report(sub)
    a = parser.parse_args(argv)
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare}
    commands |= {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench}  # cli_run
    commands["report"] = cmd_report
    try:
        commands[a.command](a)
    except EdgequantError as e:
        print(f"edgequant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgequant: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
