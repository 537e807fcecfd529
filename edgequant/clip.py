"""AWQ's weight-clipping search: per output row and group, the clip range that minimises
the group's output error on sampled tokens (Lin et al., MLSys 2024, section 3.3), in the
second-order form err = d^T G d / n with G = x^T x, so the token count costs nothing per
grid point.
"""

from __future__ import annotations

import math

import torch

from edgequant.config import AWQConfig, QuantConfig
from edgequant.primitives import fake_quantize, group_minmax


def clip_bounds(
    w: torch.Tensor,
    x: torch.Tensor,
    qcfg: QuantConfig,
    acfg: AWQConfig,
    check: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    # w [out, C] (scaled), x [n, C] (scaled inputs), check [C, C] a Gram matrix of other
    # (scaled) tokens -> (lo, hi) [out, n_groups], or None when no row's clip survives.
    # Per (channel, group) error: mean_t (x_g . (wq_g - w_g))^2 = d_g^T G_gg d_g / n, G = x^T x.
    # The clip is chosen on x; each output row keeps it only where its output error on `check`
    # (default x's own Gram) is no larger than unclipped: a few hundred tokens can miss the
    # rare huge activations that make a clip costly.
    out, c = w.shape
    g = qcfg.group_len(c)
    ng = c // g
    gram, n = x.T @ x, x.shape[0]
    blocks = torch.stack([gram[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(ng)])
    wmin, wmax = group_minmax(w, qcfg)
    amax = torch.maximum(wmin.abs(), wmax.abs())
    best_err = torch.full_like(wmax, math.inf)
    lo_best, hi_best = wmin.clone(), wmax.clone()
    for i in range(int(acfg.clip_max_shrink * acfg.clip_grid)):
        f = 1.0 - i / acfg.clip_grid
        lo, hi = (-amax * f, amax * f) if acfg.clip_form == "sym" else (wmin * f, wmax * f)
        d = (fake_quantize(w, qcfg, lo, hi)[0] - w).reshape(out, ng, g).transpose(0, 1)
        err = (torch.bmm(d, blocks) * d).sum(-1).T / n  # [out, ng]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        lo_best = torch.where(better, lo, lo_best)
        hi_best = torch.where(better, hi, hi_best)
    keep = row_errors(w, lo_best, hi_best, qcfg, gram if check is None else check)
    if not keep.any():
        return None
    keep = keep[:, None]
    return torch.where(keep, lo_best, wmin), torch.where(keep, hi_best, wmax)


def row_errors(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qcfg: QuantConfig, gram: torch.Tensor
) -> torch.Tensor:
    # w [out, C], lo/hi [out, n_groups], gram [C, C] -> [out] bool: clipped row error <= plain
    d_clip = fake_quantize(w, qcfg, lo, hi)[0] - w
    d_plain = fake_quantize(w, qcfg)[0] - w
    return ((d_clip @ gram) * d_clip).sum(1) <= ((d_plain @ gram) * d_plain).sum(1)
