"""Python API: quantize a model by name, or compare methods on the same loaded model."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from torch import nn

from edgequant.config import (
    STATIC_METHODS,
    AWQConfig,
    CalibConfig,
    MobileQuantConfig,
    QuantConfig,
    StaticConfig,
)
from edgequant.errors import EdgequantError
from edgequant.gptq import GPTQConfig
from edgequant.recipe import Recipe, apply_recipe

METHODS = ("rtn", "awq", "gptq", "awq+gptq")


def quantize_model(
    model: nn.Module,
    tokenizer,
    method: str = "awq",
    quant: QuantConfig | None = None,
    awq: AWQConfig | None = None,
    calib: CalibConfig | None = None,
    load_search: str | None = None,
    gptq: GPTQConfig | None = None,
) -> Recipe:
    """Quantize a loaded float model in place and return the recipe that did it.

    The weights end exactly as a packed checkpoint stores them (see checkpoint.finalize).
    """
    from edgequant.arch import arch_for
    from edgequant.checkpoint import finalize

    quant, awq, calib = quant or QuantConfig(), awq or AWQConfig(), calib or CalibConfig()
    if method not in METHODS:
        raise EdgequantError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    arch_for(model)
    float_state = None
    if load_search:
        recipe = Recipe.load(load_search)
    elif method in ("rtn", "gptq"):
        recipe = Recipe(quant, method, model_type=model.config.model_type)
    else:
        from edgequant.awq import awq_quantize

        if method == "awq+gptq":  # GPTQ restarts from the float weights
            float_state = {k: v.clone() for k, v in model.state_dict().items()}
        recipe = awq_quantize(model, _calibration(model, tokenizer, calib), quant, awq)
        recipe.method = method
    if recipe.method not in ("gptq", "awq+gptq"):
        if load_search or method == "rtn":
            apply_recipe(model, recipe)
        finalize(model, recipe.quant)
        return recipe
    from edgequant.gptq import gptq_quantize

    if float_state is not None:
        model.load_state_dict(float_state)
    apply_recipe(model, recipe, quantize=False)  # AWQ's scales and clips, if any
    result = gptq_quantize(model, _calibration(model, tokenizer, calib), recipe.quant, gptq)
    finalize(model, recipe.quant, result.qparams)
    return recipe


def quantize_static(
    model: nn.Module,
    tokenizer,
    method: str = "smoothquant",
    cfg: StaticConfig | None = None,
    calib: CalibConfig | None = None,
    mobilequant: MobileQuantConfig | None = None,
    state_path=None,
):
    """Integer-only (W8A8 / W4A8) simulation of a loaded float model, in place.

    SmoothQuant's scales are folded first (methods "smoothquant", "mobilequant"); then either
    the weights are rounded onto their static grids and every activation range observed on
    the calibration set, or (mobilequant) scales, clipping and the 8-bit ranges are trained
    end to end (resumable through `state_path`). Returns (Quantizers: the attached quantizers
    and their range table, the SmoothQuant Recipe or None).
    """
    from edgequant.mobilequant import train
    from edgequant.smoothquant import smoothquant
    from edgequant.static import Quantizers, observe_ranges, quantize_weights

    cfg, calib = cfg or StaticConfig(), calib or CalibConfig()
    if method not in STATIC_METHODS:
        raise EdgequantError(f"unknown method {method!r}; choose from {', '.join(STATIC_METHODS)}")
    cfg = resolved(cfg, method, tokenizer)  # what checkpoints record
    from edgequant.arch import arch_for

    if not arch_for(model).act_points:
        raise EdgequantError(f"no precision map for {arch_for(model).name} models (integer-only)")
    ids = _calibration(model, tokenizer, calib, bos=cfg.calib_bos)
    recipe = smoothquant(model, ids, cfg) if method != "static-rtn" else None
    if method == "mobilequant":
        mcfg = mobilequant or MobileQuantConfig()
        return train(model, ids, cfg, mcfg, state_path)[0], recipe
    quantize_weights(model, cfg)
    qs = Quantizers(model, cfg)
    observe_ranges(model, qs, ids, ranges=cfg.ranges)
    return qs, recipe


def resolved(cfg: StaticConfig, method: str, tokenizer) -> StaticConfig:
    """cfg as `method` runs it with `tokenizer`: its range setting, and calib_bos only where
    the tokenizer adds BOS (elsewhere the windows are the same either way)."""
    from edgequant.data import bos_prefix
    from edgequant.static import range_setting

    bos = cfg.calib_bos and bos_prefix(tokenizer) is not None
    return replace(cfg, ranges=range_setting(cfg, method), calib_bos=bos)


def _calibration(model: nn.Module, tokenizer, calib: CalibConfig, bos: bool = False):
    # -> calibration ids [n_samples, seqlen] on the model's device (BOS first: see calibration_ids)
    from edgequant.data import calibration_ids

    return calibration_ids(tokenizer, calib, bos=bos).to(next(model.parameters()).device)


def quantize(model_name: str, method: str = "awq", **kw):
    """Load `model_name` and quantize it; returns (model, tokenizer, recipe)."""
    from edgequant.zoo import load

    model, tok = load(model_name)
    return model, tok, quantize_model(model, tok, method, **kw)


@dataclass(frozen=True)
class Row:
    method: str  # "fp" or a quantization method
    seconds: float  # quantization wall time (0 for fp)
    ppl: dict  # text -> Perplexity


def compare(
    model_name: str,
    methods: tuple[str, ...] = METHODS,
    texts: tuple[str, ...] = ("austen",),
    max_windows: int | None = None,
    window: int = 2048,
    **kw,
) -> list[Row]:
    """Float model, then each method from the same float weights, each evaluated on `texts`."""
    from edgequant.data import evaluation_ids, get_source
    from edgequant.evaluate import perplexity
    from edgequant.zoo import load

    model, tok = load(model_name)
    ids = {t: evaluation_ids(tok, get_source(t)) for t in texts}

    def evaluate() -> dict:
        return {t: perplexity(model, tok, ids[t], window, max_windows) for t in texts}

    rows = [Row("fp", 0.0, evaluate())]
    for method in methods:
        model, tok = load(model_name)  # a fresh float model (a cached load takes ~0.5 s)
        t0 = time.perf_counter()
        quantize_model(model, tok, method, **kw)
        rows.append(Row(method, time.perf_counter() - t0, evaluate()))
    return rows


def table(rows: list[Row]) -> str:
    """Markdown table: one row per method, one perplexity column per text."""
    texts = list(rows[0].ppl)
    head = "| method | " + " | ".join(f"ppl {t}" for t in texts) + " | quant time (s) |"
    lines = [head, "|" + "---|" * (len(texts) + 2)]
    for r in rows:
        cells = " | ".join(f"{r.ppl[t].ppl:.3f}" for t in texts)
        lines.append(f"| {r.method} | {cells} | {r.seconds:.1f} |")
    return "\n".join(lines)
