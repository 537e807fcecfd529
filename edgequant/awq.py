"""AWQ: activation-aware scale search and weight-clipping search (Lin et al., MLSys 2024).

Per block, one forward pass. When a scale group's input arrives (all earlier groups of the
block already quantized), the scale s = mean|x|^alpha is grid-searched, the clip bounds are
searched on the scaled weights, the group is folded and quantized in place, and the rest of
the forward continues on the group's quantized weights; its output becomes the next block's
input. After the forward every group is applied with `apply_group`, exactly as a saved
recipe is re-applied.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.arch import ArchSpec, ScaleGroup, arch_for, fold_index
from edgequant.calibrate import bf16_is_fast, bf16_linears, check_finite, run_layerwise
from edgequant.clip import clip_bounds
from edgequant.config import AWQConfig, QuantConfig
from edgequant.primitives import fake_quantize
from edgequant.recipe import Recipe, apply_group, check_group_size


def candidate_scale(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    # x_mean [C], w_mean [C] or None -> s [C], normalised so that max(s) * min(s) = 1
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / w_mean.pow(1.0 - alpha).clamp(min=1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    # w [out, C] -> [C]: |w| relative to its group's absmax, averaged over output channels
    out, c = w.shape
    g = cfg.group_len(c)
    wg = w.abs().reshape(out, c // g, g)
    return (wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(out, c).mean(0)


def gram_error(
    d: torch.Tensor, gram: torch.Tensor, n: int, rows: torch.Tensor | None = None
) -> float:
    # d [out, C] weight error, gram [C, C] = X^T X over n tokens, rows [out] weights or None
    # -> mean squared output error (each row's error scaled by its weight)
    err = ((d @ gram) * d).sum(1)
    if rows is not None:
        err = err * rows
    return err.sum().item() / (n * d.shape[0])


def scaled_error(
    w: torch.Tensor,
    s: torch.Tensor,
    cfg: QuantConfig,
    gram: torch.Tensor,
    n: int,
    rows: torch.Tensor | None = None,
) -> float:
    # w [out, C], s [C] -> output error of Q(w * s) / s, the weight the block effectively uses
    return gram_error(fake_quantize(w * s, cfg)[0] / s - w, gram, n, rows)


def row_sensitivity(
    module: nn.Module, lins: list[nn.Linear], saved: list[tuple], gen: torch.Generator
) -> torch.Tensor:
    """Per output row of `lins` (concatenated) -> [sum out], mean 1: E_t (dO/dy_j)^2.

    O is the module's output on each saved (args, kwargs) call and y_j output row j of a
    linear. With a Gaussian probe r on O, E[(d(r.O)/dy)^2] is the diagonal of J^T J, so the
    weighted Gram error approximates the module's output error to second order (cross-row
    and token-dependent terms dropped).
    """
    acc = [torch.zeros(lin.out_features, dtype=torch.float64) for lin in lins]
    outs: dict[nn.Module, torch.Tensor] = {}

    def grab(m, args, y):
        outs[m] = y.detach().requires_grad_()
        return outs[m]

    handles = [lin.register_forward_hook(grab) for lin in lins]
    try:
        with torch.enable_grad():
            for args, kw in saved:
                out = _first(module(*args, **kw)).float()
                probe = torch.randn(out.shape, generator=gen).to(out.device)
                grads = torch.autograd.grad((out * probe).sum(), [outs[lin] for lin in lins])
                for a, g in zip(acc, grads, strict=True):
                    a += g.double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
    finally:
        for h in handles:
            h.remove()
    rows = torch.cat(acc).float()
    if not torch.isfinite(rows).all() or rows.sum() <= 0:
        return torch.ones_like(rows)
    return rows / rows.mean()


def pool_channels(v: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    # v [C] per input channel, idx [C] its source channel in 0..n-1 -> [n] mean per source
    idx = idx.to(v.device)
    total = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, idx, v)
    return total / torch.bincount(idx, minlength=n).clamp(min=1).to(v.dtype)


def search_scale(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    loss: Callable[[torch.Tensor], float],
    acfg: AWQConfig,
) -> tuple[torch.Tensor | None, float]:
    """Grid over alpha = i / n_grid; returns (best s or None if no finite loss, best loss).

    x_mean, w_mean [C] (w_mean None: no duo scaling); loss takes a candidate s [C].
    """
    best, best_loss = None, math.inf
    for i in range(acfg.n_grid):
        s = candidate_scale(x_mean, w_mean, i / acfg.n_grid)
        if not torch.isfinite(s).all():
            continue
        val = loss(s)
        if math.isfinite(val) and val < best_loss:
            best, best_loss = s, val
    return best, best_loss


def chunk_subset(n_chunks: int, chunk: int, samples: int) -> list[int]:
    """Indices of evenly spaced chunks holding about `samples` samples (0: every chunk)."""
    if samples <= 0 or samples >= n_chunks * chunk:
        return list(range(n_chunks))
    k = max(1, math.ceil(samples / chunk))
    return [round(j * n_chunks / k) for j in range(k)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class AWQSearch:
    """AWQ over a model, block by block; `recipe` collects what was found."""

    def __init__(self, model: nn.Module, qcfg: QuantConfig, acfg: AWQConfig):
        # the recipe records the settings that ran
        acfg = acfg.resolved(qcfg.bits, bf16_is_fast(next(model.parameters()).device))
        self.model, self.qcfg, self.acfg = model, qcfg, acfg
        self.spec: ArchSpec = arch_for(model)
        self.recipe = Recipe(quant=qcfg, method="awq", awq=acfg, model_type=model.config.model_type)
        self.gen = torch.Generator().manual_seed(acfg.seed)

    def _sample(self, xs: list[torch.Tensor], n: int) -> torch.Tensor:
        # xs: chunks [B, T, C] -> [min(n, N), C] rows drawn without replacement (seeded)
        flat = [x.reshape(-1, x.shape[-1]) for x in xs]
        total = sum(f.shape[0] for f in flat)
        if total <= n:
            return torch.cat(flat).float()
        idx = torch.randperm(total, generator=self.gen)[:n].sort().values
        out, start = [], 0
        for f in flat:
            sel = idx[(idx >= start) & (idx < start + f.shape[0])] - start
            out.append(f[sel])
            start += f.shape[0]
        return torch.cat(out).float()

    def _exact_loss(self, lins: list[nn.Linear], module: nn.Module, call: Callable) -> Callable:
        """Paper loss: MSE of the inspected module's output with the group fake-quantized.

        Under bf16 matmuls (fast search) every linear of `module` holds its bfloat16 weight
        while one candidate is scored: for float32 weights, the values bf16_linears would
        convert on each call, converted once per candidate instead.
        """
        originals = [lin.weight.data for lin in lins]
        others = [m for m in module.modules() if isinstance(m, nn.Linear) and m not in lins]
        bf16 = self.acfg.bf16_matmul  # resolved: never for the exact search
        ref = call()

        def loss(s: torch.Tensor) -> float:
            kept = [m.weight.data for m in others]
            try:
                for lin, w in zip(lins, originals, strict=True):
                    wq = fake_quantize(w.float() * s, self.qcfg)[0] / s
                    lin.weight.data = wq.to(torch.bfloat16 if bf16 else w.dtype)
                for m in others if bf16 else []:
                    m.weight.data = m.weight.data.to(torch.bfloat16)
                return (call() - ref).float().pow(2).mean().item()
            finally:
                for lin, w in zip(lins + others, originals + kept, strict=True):
                    lin.weight.data = w

        return loss

    def _scale_loss(self, block, group, xs, w_cat, gram, n, call, sens_args) -> Callable:
        # returns loss(s [C]) over the group's input channels
        """The search objective for one group: fast (sampled Gram) or the paper's exact loss.

        sens_args: the inspected module's (args, kwargs) on the samples that estimate the
        row sensitivities (empty: unweighted). The probes draw on the search's one seeded
        generator, so turning the weighting off also moves later token samples.
        """
        single = group.linears == (group.inspect,)
        fast = self.acfg.search == "fast"
        lins = [block.get_submodule(name) for name in group.linears]
        mod = block.get_submodule(group.inspect)
        gram_sample = not (single and self.acfg.single_all_tokens)
        if fast and gram_sample and (not self.acfg.loss_samples or single):
            rows = None
            if not single and sens_args:
                rows = row_sensitivity(mod, lins, sens_args, self.gen).to(w_cat.device)
            return lambda s: scaled_error(w_cat, s, self.qcfg, gram, n, rows)
        if not single:
            return self._exact_loss(lins, mod, call)
        # exact, one inspected linear: its output MSE over all tokens is tr(D G D^T) / (N out)
        flats = [x.reshape(-1, x.shape[-1]).float() for x in xs]
        g_all, n_all = sum(f.T @ f for f in flats), sum(f.shape[0] for f in flats)
        return lambda s: scaled_error(w_cat, s, self.qcfg, g_all, n_all)

    def _clips(self, i: int, group: ScaleGroup, lins: list, xs: list, sv, gram) -> dict:
        # sv [C] the group's scale, gram [C, C] of the unscaled Gram sample (clip check)
        clips = {}
        if not self.acfg.clip:
            return clips
        xc = self._sample(xs, self.acfg.clip_tokens) / sv
        check = gram / (sv[:, None] * sv[None, :])
        for name, lin in zip(group.linears, lins, strict=True):
            if self.acfg.clip_all or name not in self.spec.no_clip:
                b = clip_bounds(lin.weight.float() * sv, xc, self.qcfg, self.acfg, check)
                if b is not None:
                    clips[name] = self.recipe.clips[f"{i}.{name}"] = b
        return clips

    def _search(
        self, key: str, loss: Callable, x_mean: torch.Tensor, w_cat: torch.Tensor, idx
    ) -> torch.Tensor | None:
        """Grid-search s [C_prev] (one entry per prev output channel); None on fallback.

        loss takes s over the group's C input channels; idx [C] maps them to prev's channels.
        """
        n_prev = int(idx.max()) + 1
        w_mean = weight_mean(w_cat, self.qcfg) if self.acfg.duo_scaling else None
        s, _ = search_scale(
            pool_channels(x_mean, idx, n_prev),
            None if w_mean is None else pool_channels(w_mean, idx, n_prev),
            lambda sp: loss(sp[idx]),
            self.acfg,
        )
        if s is None:
            self.recipe.fallbacks.append(key)
            tqdm.write(f"block {key}: no finite loss, identity scale used")
        else:
            self.recipe.scales[key] = s
        return s

    def _on_group(self, i: int, block: nn.Module, group: ScaleGroup, xs: list, call, sens_args):
        """Search one group on its input chunks xs [B, T, C]; leaves effective weights in place.

        Returns ((s, clips) for apply_group, (rtn error, awq error) for the report).
        """
        qcfg, c = self.qcfg, xs[0].shape[-1]
        for x in xs:
            check_finite(x, f"block {i} {group.name} input")
        x_mean = sum(torch.linalg.vector_norm(x.reshape(-1, c).float(), 1, dim=0) for x in xs)
        x_mean = x_mean / sum(x.numel() // c for x in xs)
        lins = [block.get_submodule(n) for n in group.linears]
        w_cat = torch.cat([lin.weight.detach().float() for lin in lins])
        xg = self._sample(xs, self.acfg.gram_tokens)
        gram, n = xg.T @ xg, xg.shape[0]
        s, idx = None, fold_index(block, group, self.acfg.gqa_fold)
        if idx is not None:
            loss = self._scale_loss(block, group, xs, w_cat, gram, n, call, sens_args)
            s = self._search(f"{i}.{group.name}", loss, x_mean, w_cat, idx)
        sv = torch.ones(c, device=w_cat.device) if s is None else s[idx]
        clips = self._clips(i, group, lins, xs, sv, gram)
        for name, lin in zip(group.linears, lins, strict=True):
            lo, hi = clips.get(name, (None, None))
            eff = fake_quantize(lin.weight.float() * sv, qcfg, lo, hi)[0] / sv
            lin.weight.data = eff.to(lin.weight.dtype)
        w_eff = torch.cat([lin.weight.float() for lin in lins])
        rtn_err = scaled_error(w_cat, torch.ones_like(sv), qcfg, gram, n)
        return (s, clips), (rtn_err, gram_error(w_eff - w_cat, gram, n))

    def _process(self, i: int, block: nn.Module, run: Callable) -> None:
        """One chunked forward of block i; each group is searched when its input is complete."""
        groups = self.spec.groups
        exact = self.acfg.search == "exact"
        module_loss = exact or self.acfg.loss_samples > 0 or self.acfg.sensitivity_samples > 0
        originals = {n: block.get_submodule(n).weight.data for g in groups for n in g.linears}
        done: dict[str, tuple] = {}
        inspect_args: dict[str, list] = {g.name: [] for g in groups}
        searching = [False]
        handles = []
        for g in groups:
            if module_loss and g.inspect not in g.linears:

                def keep(m, args, kw, g=g):
                    if not searching[0]:
                        inspect_args[g.name].append((args, kw))

                mod = block.get_submodule(g.inspect)
                handles.append(mod.register_forward_pre_hook(keep, with_kwargs=True))

        def on_all(xs: list[torch.Tensor], g: ScaleGroup) -> None:
            mod = block.get_submodule(g.inspect)
            pick = chunk_subset(len(xs), xs[0].shape[0], 0 if exact else self.acfg.loss_samples)
            sens_args = []
            if g.inspect in g.linears:
                call = lambda: torch.cat([mod(xs[k]) for k in pick])  # noqa: E731
            else:
                saved = [inspect_args[g.name][k] for k in pick] if module_loss else []
                call = lambda: torch.cat([_first(mod(*a, **kw)) for a, kw in saved])  # noqa: E731
                if not exact and self.acfg.sensitivity_samples:
                    sub = chunk_subset(len(xs), xs[0].shape[0], self.acfg.sensitivity_samples)
                    sens_args = [inspect_args[g.name][k] for k in sub]
            searching[0] = True
            try:
                done[g.name] = self._on_group(i, block, g, xs, call, sens_args)
            finally:
                searching[0] = False
                inspect_args[g.name] = []

        gather = {g.linears[0]: (lambda xs, g=g: on_all(xs, g)) for g in groups}
        try:
            with bf16_linears(block, enabled=self.acfg.bf16_matmul):
                run(gather)
        finally:
            for h in handles:
                h.remove()
            for name, w in originals.items():
                block.get_submodule(name).weight.data = w
        missing = [g.name for g in groups if g.name not in done]
        if missing:
            raise RuntimeError(f"block {i}: groups {missing} never received an input")
        for g in groups:
            apply_group(block, self.spec, g, self.qcfg, *done[g.name][0])
        rtn = sum(d[1][0] for d in done.values())
        awq = sum(d[1][1] for d in done.values())
        self.recipe.report.append({"block": i, "rtn_error": rtn, "awq_error": awq})
        tqdm.write(
            f"block {i:3d}: output error rtn {rtn:.3e}  awq {awq:.3e}  ({awq / rtn - 1:+.0%})"
        )


def awq_quantize(
    model: nn.Module, input_ids: torch.Tensor, qcfg: QuantConfig, acfg: AWQConfig
) -> Recipe:
    """Search AWQ scales and clips on the calibration ids [N, T]; quantizes `model` in place."""
    search = AWQSearch(model, qcfg, acfg)
    check_group_size(model, search.spec, qcfg)
    t0 = time.perf_counter()
    run_layerwise(model, search.spec, input_ids, search._process, desc="awq")
    search.recipe.searched_on = {
        "device": device_name(input_ids.device),
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    return search.recipe


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
