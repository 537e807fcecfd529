"""GPTQ (Frantar et al., 2023): error-compensating rounding with the inverse Hessian.

Per linear, H = 2 X^T X / N from the captured inputs (bf16 products per chunk summed in
float32 where the device does bf16 fast, calibrate.bf16_is_fast; `bf16_hessian=False` for
float32 throughout). Columns are quantized in order (or by decreasing diag(H) with
act_order), each column's rounding error spread over the columns still to come through
the Cholesky factor of H^-1, in lazy blocks of `block_size` columns. The quantizer is the
one RTN and AWQ use (bits, group size, zero point); a group's scale and zero are taken
when its first column is reached, or, with act_order, from the original weights ("static
groups") so checkpoints keep the usual layout. Within a block the linears are quantized in
order: later groups see the quantized earlier ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.arch import arch_for
from edgequant.calibrate import bf16_is_fast, bf16_linears, check_finite, run_layerwise
from edgequant.config import QuantConfig
from edgequant.errors import EdgequantError
from edgequant.primitives import dequantize, quant_params, quantize
from edgequant.recipe import check_group_size


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of mean(diag(H)) added to the diagonal
    act_order: bool = False
    # None: where bfloat16 is fast on the model's device (calibrate.bf16_is_fast), else float32
    bf16_matmul: bool | None = None  # block forwards as bf16 matmuls, float32 accumulation
    bf16_hessian: bool | None = None  # X^T X per chunk in bf16 (2x faster), summed in float32

    def resolved(self, bf16_fast: bool) -> GPTQConfig:
        """This config with the bf16 settings left to None fixed for the device."""
        matmul, hessian = self.bf16_matmul, self.bf16_hessian
        return replace(
            self,
            bf16_matmul=bf16_fast if matmul is None else matmul,
            bf16_hessian=bf16_fast if hessian is None else hessian,
        )


@dataclass
class GPTQResult:
    quant: QuantConfig
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)


def inverse_hessian_factor(h: torch.Tensor, damp: float, notes: list[str], name: str):
    # h [C, C] -> upper Cholesky factor of (h + damping)^-1 [C, C], damping raised until it works
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    h64, mean_diag = h.double(), h.diagonal().double().mean().clamp(min=1e-8)
    for k in range(6):
        lam = damp if k == 0 else max(damp, 1e-4) * 10**k
        chol, info = torch.linalg.cholesky_ex(h64 + lam * mean_diag * eye)
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0 and torch.isfinite(u).all():
                if k:
                    notes.append(f"{name}: Hessian ill-conditioned, damping raised to {lam:g}")
                return u.float()
    raise EdgequantError(f"{name}: Hessian is not positive definite even with damping {lam:g}")


def gptq_weight(
    w: torch.Tensor,
    h: torch.Tensor,
    cfg: QuantConfig,
    gcfg: GPTQConfig,
    notes: list[str] | None = None,
    name: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w [out, C], h [C, C] -> (quantized w [out, C] float32, scale [out, ng], zero [out, ng])
    notes = [] if notes is None else notes
    w, h = w.float().clone(), h.float().clone()
    out, n = w.shape
    g = cfg.group_len(n)
    col = QuantConfig(cfg.bits, -1, cfg.zero_point)  # quantizer for [out, k] slices
    dead = h.diagonal() == 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        notes.append(f"{name}: {int(dead.sum())} dead input channels zeroed")
    scale, zero = torch.zeros(out, n // g), torch.zeros(out, n // g)
    perm = None
    if gcfg.act_order:
        scale, zero = quant_params(w, cfg)  # static groups from the original weights
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, gcfg.damp, notes, name)
    q = torch.zeros_like(w)
    # without act_order a block holds whole groups, so a group's parameters see its columns
    bs = math.ceil(gcfg.block_size / g) * g if perm is None else gcfg.block_size
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        w1, err = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            grp = (int(perm[c]) if perm is not None else c) // g
            if perm is None and c % g == 0:
                s, z = quant_params(w1[:, i : i + g], col)
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            s, z = scale[:, grp : grp + 1], zero[:, grp : grp + 1]
            qc = dequantize(quantize(w1[:, i : i + 1], s, z, col), s, z, col)[:, 0]
            q[:, c] = qc
            e = (w1[:, i] - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q, scale, zero


def _process(model: nn.Module, cfg: QuantConfig, gcfg: GPTQConfig, result: GPTQResult) -> Callable:
    spec = arch_for(model)

    def process(i: int, block: nn.Module, run: Callable) -> None:
        errs = {}

        def on_all(xs: list[torch.Tensor], group) -> None:
            c = xs[0].shape[-1]
            h = torch.zeros(c, c)
            count = 0
            for x in xs:
                check_finite(x, f"block {i} {group.name} input")
                f = x.reshape(-1, c).to(torch.bfloat16 if gcfg.bf16_hessian else torch.float32)
                h += (f.T @ f).float()
                count += f.shape[0]
            h *= 2.0 / count
            for name in group.linears:
                lin = block.get_submodule(name)
                full = f"{spec.blocks}.{i}.{name}"
                w = lin.weight.detach().float()
                q, s, z = gptq_weight(w, h, cfg, gcfg, result.notes, full)
                d = q - w
                errs[name] = ((d @ h) * d).sum().item() / (2 * d.shape[0])
                result.qparams[full] = (s, z)
                lin.weight.data = q.to(lin.weight.dtype)

        gather = {g.linears[0]: (lambda xs, g=g: on_all(xs, g)) for g in spec.groups}
        with bf16_linears(block, enabled=gcfg.bf16_matmul):
            run(gather)
        total = sum(errs.values())
        result.report.append({"block": i, "gptq_error": total})
        tqdm.write(f"block {i:3d}: output error gptq {total:.3e}")

    return process


def gptq_quantize(
    model: nn.Module, input_ids: torch.Tensor, cfg: QuantConfig, gcfg: GPTQConfig | None = None
) -> GPTQResult:
    """GPTQ on the calibration ids [N, T]; quantizes `model` in place (weights on the grid)."""
    gcfg = (gcfg or GPTQConfig()).resolved(bf16_is_fast(next(model.parameters()).device))
    spec = arch_for(model)
    check_group_size(model, spec, cfg)
    result = GPTQResult(quant=cfg)
    run_layerwise(model, spec, input_ids, _process(model, cfg, gcfg, result), desc="gptq")
    for note in result.notes:
        tqdm.write(f"gptq: {note}")
    if not all(math.isfinite(r["gptq_error"]) for r in result.report):
        raise EdgequantError("GPTQ produced a non-finite error")
    return result
