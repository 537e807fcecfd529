"""Group-wise integer quantization as pure tensor functions.

Asymmetric (zero point): codes q in [0, 2^b - 1], w ~ (q - z) * scale.
Symmetric: codes q in [-2^(b-1), 2^(b-1) - 1], w ~ q * scale, z = 0.
Optional clip bounds lo/hi ([out, n_groups]) clamp each group before its range is taken.
"""

from __future__ import annotations

import torch

from edgequant.config import QuantConfig


def _grouped(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    # w [out, in] -> [out, n_groups, group_len]
    out, n_in = w.shape
    g = cfg.group_len(n_in)
    return w.reshape(out, n_in // g, g)


def clamp_groups(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cfg: QuantConfig
) -> torch.Tensor:
    # w [out, in], lo/hi [out, n_groups] -> [out, in]
    wg = _grouped(w, cfg)
    return torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(w.shape)


def quant_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # w [out, in] -> scale [out, n_groups], zero [out, n_groups] (zero is 0 when symmetric)
    wg = _grouped(w, cfg).float()
    if cfg.zero_point:
        qmax = 2**cfg.bits - 1
        wmax = wg.amax(dim=-1)
        wmin = wg.amin(dim=-1)
        scale = (wmax - wmin).clamp(min=1e-5) / qmax
        zero = (-torch.round(wmin / scale)).clamp(0, qmax)
        return scale, zero
    qmax = 2 ** (cfg.bits - 1) - 1
    scale = wg.abs().amax(dim=-1).clamp(min=1e-5) / qmax
    return scale, torch.zeros_like(scale)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig
) -> torch.Tensor:
    # w [out, in], scale/zero [out, n_groups] -> integer codes [out, in] (int16)
    wg = _grouped(w, cfg).float()
    if cfg.zero_point:
        lo, hi = 0, 2**cfg.bits - 1
    else:
        lo, hi = -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(lo, hi).to(torch.int16).reshape(w.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig
) -> torch.Tensor:
    # q [out, in] integer codes, scale/zero [out, n_groups] -> w [out, in] float32
    qg = _grouped(q, cfg).float()
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(
    w: torch.Tensor,
    cfg: QuantConfig,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # w [out, in] -> (dequantized w [out, in] float32, scale, zero [out, n_groups])
    w = w.float()
    if hi is not None:
        w = clamp_groups(w, lo, hi, cfg)
    scale, zero = quant_params(w, cfg)
    return dequantize(quantize(w, scale, zero, cfg), scale, zero, cfg), scale, zero


def group_minmax(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # w [out, in] -> (min, max) per group, each [out, n_groups]
    wg = _grouped(w, cfg).float()
    return wg.amin(dim=-1), wg.amax(dim=-1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    # x [...] -> round(x) forward, identity gradient backward (straight-through estimator)
    return x + (torch.round(x) - x).detach()


def static_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # lo, hi [] a per-tensor range -> scale [], zero [] of its asymmetric unsigned grid; the
    # range is widened to hold 0 so that zero is exact (zero rounds straight-through)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = (hi - lo).clamp(min=1e-8) / (2**bits - 1)
    return scale, round_ste(-lo / scale)


class _StaticFakeQuant(torch.autograd.Function):
    """(clamp(round(x / scale) + zero, 0, top) - zero) * scale, rounding straight-through.

    The same values and gradients as the composed ops, on two buffers instead of a dozen:
    d/dx = 1 inside the grid, d/dzero = -scale outside it, d/dscale = (q - zero) - x / scale
    inside (the rounding residual) and q - zero outside.
    """

    @staticmethod
    def forward(ctx, x, scale, zero, top: int):
        # x [...], scale/zero [] or broadcastable to x -> [...] on the grid, x.dtype
        u = x.float() / scale
        q = u.round().add_(zero)  # round(u) is what x + (round(x) - x) gives (Sterbenz)
        outside = (q < 0).logical_or_(q > top)  # bool masks: no float copies
        q.clamp_(0, top).sub_(zero)
        resid = u.masked_fill_(outside, 0.0).neg_().add_(q)  # (q - zero) - u inside, else q - zero
        ctx.save_for_backward(resid, outside, scale)
        ctx.dtype = x.dtype
        return q.mul_(scale).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # g [...] -> d/dx [...], d/dscale and d/dzero summed to scale's shape
        resid, outside, scale = ctx.saved_tensors
        g = g.float()
        gx = g.masked_fill(outside, 0.0)
        g_scale = (g * resid).sum_to_size(scale.shape) if ctx.needs_input_grad[1] else None
        g_zero = ((gx - g) * scale).sum_to_size(scale.shape) if ctx.needs_input_grad[2] else None
        return gx.to(ctx.dtype), g_scale, g_zero, None


def fake_quant_static(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> torch.Tensor:
    # x [...], lo/hi [] (or broadcastable to x: a range per row) -> x rounded onto the static
    # grid of [lo, hi] (2^bits levels), x.dtype;
    # differentiable in x (inside the range), lo and hi (straight-through rounding)
    scale, zero = static_qparams(lo, hi, bits)
    if torch.is_grad_enabled() and (x.requires_grad or lo.requires_grad or hi.requires_grad):
        return _StaticFakeQuant.apply(x, scale, zero, 2**bits - 1)
    q = x.float() / scale  # no graph: the same values in place on one buffer
    q.round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)
    return q.to(x.dtype)


def fake_quant_sym(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    # x [...], amax broadcastable to x -> x on the signed grid -2^(b-1)..2^(b-1)-1 of
    # scale amax / (2^(b-1) - 1); differentiable in x and amax (straight-through rounding)
    qmax = 2 ** (bits - 1) - 1
    scale = amax.clamp(min=1e-8) / qmax
    return (torch.clamp(round_ste(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)


@torch.no_grad()
def least_error_clip(
    w: torch.Tensor,
    bits: int,
    zero_point: bool,
    ratios: torch.Tensor,
    per_row: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    # w [rows, n] (each row on its own grid), ratios [k], weight [n] or None -> [rows, 1] the
    # ratio r of least squared rounding error (each column's error times its weight) of each
    # row on the grid of [r * min, r * max] (zero_point) or of r * max |w| (signed);
    # per_row False: one r for all rows ([1, 1]), their summed error
    w = w.float()
    lo, hi, amax = w.amin(1, keepdim=True), w.amax(1, keepdim=True), w.abs().amax(1, keepdim=True)
    best = torch.full((len(w) if per_row else 1, 1), float("inf"), device=w.device)
    chosen = torch.ones_like(best)
    for r in ratios.tolist():
        if zero_point:
            q = fake_quant_static(w, r * lo, r * hi, bits)
        else:
            q = fake_quant_sym(w, r * amax, bits)
        err = q.sub_(w).pow_(2)
        err = (err if weight is None else err.mul_(weight)).sum(1, keepdim=True)
        err = err if per_row else err.sum(0, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        chosen = torch.where(better, r, chosen)
    return chosen
