"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

Per scale group of the architecture table (norm -> q/k/v, v -> o where the widths match,
norm -> gate/up, up -> down) one per-channel scale s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
divides the previous op's output and multiplies the group's weight columns: float outputs
are unchanged, and the input becomes easier to hold on one static per-tensor range.
alpha is fixed (StaticConfig.alpha) or grid-searched per group: the loss is the output error
of the group's linears with the input on a static a_bits range (min/max, or of least
squared error as StaticConfig.ranges sets it) and the weights on their static grid (see
edgequant.static), over a token sample. s = 1 stays when nothing beats it.
The result is a Recipe holding only scales; `apply_recipe(model, r, quantize=False)` refolds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgequant.arch import ScaleGroup, arch_for, fold_index
from edgequant.calibrate import check_finite, run_layerwise
from edgequant.config import QuantConfig, StaticConfig
from edgequant.primitives import fake_quant_static
from edgequant.recipe import Recipe, apply_group
from edgequant.static import (
    float_histogram,
    least_error_range,
    range_setting,
    static_weight,
    weight_config,
)


def smooth_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    # x_max [C] max |x| per input channel, w_max [C] max |w| per input column -> s [C]
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def static_error(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    grids: list,
    s: torch.Tensor,
    a_bits: int,
    refs: list[torch.Tensor] | None = None,
    ranges: str = "minmax",
) -> float:
    # x [n, C] inputs, ws [out_k, C] weights with their (QuantConfig, per-channel) grids, s [C],
    # refs [n, out_k] the float outputs x @ w.T (computed when None) -> mean squared output
    # error of the linears with x / s on one static range (set as `ranges` sets it at 8
    # bits), w * s on its grid
    xs = x / s
    lo, hi = xs.min(), xs.max()
    if ranges == "mse" and a_bits == 8:
        lo, hi = (t.to(xs.device) for t in least_error_range(float_histogram(xs)))
        lo, hi = lo.clamp(min=xs.min()), hi.clamp(max=xs.max())  # bin centres may lie beyond
    xq = fake_quant_static(xs, lo, hi, a_bits)
    refs = refs or [x @ w.T for w in ws]
    err = 0.0
    for w, ref, (qcfg, per_channel) in zip(ws, refs, grids, strict=True):
        wq = static_weight(w * s, qcfg, per_channel)
        err += (xq @ wq.T - ref).pow(2).mean().item()
    return err


class SmoothSearch:
    """SmoothQuant over a model, block by block; `recipe` collects the scales."""

    def __init__(self, model: nn.Module, cfg: StaticConfig):
        self.cfg, self.spec = cfg, arch_for(model)
        self.recipe = Recipe(
            quant=QuantConfig(cfg.w_bits, -1),
            method="smoothquant",
            model_type=model.config.model_type,
        )
        self.gen = torch.Generator().manual_seed(0)

    def _scale(
        self, key: str, block: nn.Module, group: ScaleGroup, xs: list
    ) -> torch.Tensor | None:
        """Search s [C] for one group from its input chunks xs [B, T, C]; None keeps s = 1."""
        c = xs[0].shape[-1]
        flat = torch.cat([x.reshape(-1, c) for x in xs]).float()
        check_finite(flat, f"block {key} input")
        lins = [block.get_submodule(n) for n in group.linears]
        ws = [lin.weight.detach().float() for lin in lins]
        grids = [weight_config(n, self.spec, self.cfg) for n in group.linears]
        x_max = flat.abs().amax(0)
        w_max = torch.cat(ws).abs().amax(0)
        if self.cfg.alpha is not None:
            return smooth_scale(x_max, w_max, self.cfg.alpha)
        n = min(self.cfg.search_tokens, flat.shape[0])
        x = flat[torch.randperm(flat.shape[0], generator=self.gen)[:n]]
        refs = [x @ w.T for w in ws]
        a_bits, ranges = self.cfg.a_bits, range_setting(self.cfg, "smoothquant")
        ones = torch.ones_like(x_max)
        best, best_err = None, static_error(x, ws, grids, ones, a_bits, refs, ranges)
        for i in range(self.cfg.alpha_grid):
            s = smooth_scale(x_max, w_max, i / self.cfg.alpha_grid)
            err = static_error(x, ws, grids, s, a_bits, refs, ranges)
            if math.isfinite(err) and err < best_err:
                best, best_err = s, err
        return best

    def _process(self, i: int, block: nn.Module, run) -> None:
        found: dict[str, torch.Tensor] = {}

        def on_group(xs: list, g: ScaleGroup) -> None:
            if fold_index(block, g, gqa=False) is not None:
                s = self._scale(f"{i}.{g.name}", block, g, xs)
                if s is not None:
                    found[g.name] = s

        run({g.linears[0]: (lambda xs, g=g: on_group(xs, g)) for g in self.spec.groups})
        for g in self.spec.groups:  # after the forward: smoothing leaves float outputs as they were
            if g.name in found:
                self.recipe.scales[f"{i}.{g.name}"] = found[g.name]
                apply_group(
                    block, self.spec, g, self.recipe.quant, found[g.name], {}, quantize=False
                )


def smoothquant(model: nn.Module, input_ids: torch.Tensor, cfg: StaticConfig) -> Recipe:
    """Search and fold SmoothQuant scales on calibration ids [N, T]; the model stays float."""
    search = SmoothSearch(model, cfg)
    run_layerwise(model, search.spec, input_ids, search._process, desc="smoothquant")
    return search.recipe
