"""Integer-only execution, simulated: weights on 8- or 4-bit grids and a static per-tensor
quantizer at every point of the architecture's precision map (MobileQuant's setting).

`attach(model, cfg)` gives every block one `ActQuant` per `ActPoint`: forward hooks quantize
module inputs and outputs, and a softmax attention registered with transformers
("edgequant_static") quantizes the KV cache and the softmax input and output. Quantizers
start observing (min/max over what flows through); `Quantizers.freeze()` checks every range
and switches them to quantizing. `Quantizers.remove()` restores the model's own forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.arch import ActPoint, ArchSpec, arch_for, blocks_of
from edgequant.config import RANGES, QuantConfig, StaticConfig
from edgequant.errors import EdgequantError
from edgequant.primitives import fake_quant_static, fake_quantize, static_qparams

ATTN_IMPL = "edgequant_static"


class ActQuant(nn.Module):
    """One static per-tensor asymmetric quantizer: range [lo, hi] on 2^bits levels.

    mode "observe" widens the range to what passes through (and passes it unchanged),
    "quant" fake-quantizes, "export" does the same as torch's exportable 8-bit fake-quant
    (16-bit points pass through), "off" passes through. For training, `relative(True)` holds the
    range in units of its observed width (so one learning rate suits every point).
    """

    def __init__(self, bits: int, name: str, device=None):
        super().__init__()
        self.bits, self.name, self.mode = bits, name, "observe"
        self.lo = nn.Parameter(torch.tensor(math.inf, device=device), requires_grad=False)
        self.hi = nn.Parameter(torch.tensor(-math.inf, device=device), requires_grad=False)
        self.register_buffer("unit", torch.tensor(1.0, device=device))

    @torch.no_grad()
    def relative(self, on: bool) -> None:
        """Hold lo/hi in units of the observed width (on) or as values (off); same range."""
        width = ((self.hi - self.lo) * self.unit).clamp(min=1e-8)
        unit = width if on else torch.ones_like(width)
        self.lo.mul_(self.unit / unit)
        self.hi.mul_(self.unit / unit)
        self.unit.copy_(unit)

    def range(self) -> dict:
        """The effective range (widened to hold 0, as quantizing does) and bit width."""
        lo, hi = (self.lo * self.unit).item(), (self.hi * self.unit).item()
        return {"bits": self.bits, "lo": min(lo, 0.0), "hi": max(hi, 0.0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            return fake_quant_static(x, self.lo * self.unit, self.hi * self.unit, self.bits)
        if self.mode == "export":  # an ONNX QDQ pair at 8 bits (16-bit points stay float)
            if self.bits != 8:
                return x
            scale, zero = static_qparams(self.lo * self.unit, self.hi * self.unit, 8)
            return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), 0, 255)
        if self.mode == "observe":
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach())  # one pass, no float copy
                self.lo.copy_(torch.minimum(self.lo, lo.float()))
                self.hi.copy_(torch.maximum(self.hi, hi.float()))
        return x

    def extra_repr(self) -> str:
        lo, hi = (self.lo * self.unit).item(), (self.hi * self.unit).item()
        return f"{self.name}, bits={self.bits}, range=[{lo:.4g}, {hi:.4g}]"


def point_bits(point: ActPoint, cfg: StaticConfig) -> int:
    return max(point.bits, cfg.a_bits)


def static_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    # query [B, H, T, D], key/value [B, KV, S, D], mask [B, 1, T, S] additive
    # -> (output [B, T, H, D], probabilities [B, H, T, S])
    qs = getattr(module, "_edgequant_static", None) or {}
    ident = lambda t: t  # noqa: E731
    key, value = qs.get("k", ident)(key), qs.get("v", ident)(value)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else module.head_dim**-0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = qs.get("scores", ident)(scores.masked_fill(mask != 0, 0.0)) + mask
    else:  # masked entries are not data: they neither widen the range nor get rounded
        scores = qs.get("scores", ident)(scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = qs.get("probs", ident)(probs)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPL, static_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)


def _in_hook(q: ActQuant):
    def hook(module, args):
        if not args:
            raise EdgequantError(f"{q.name}: expected the input as a positional argument")
        return (q(args[0]), *args[1:])

    return hook


def _out_hook(q: ActQuant):
    def hook(module, args, out):
        return (q(out[0]), *out[1:]) if isinstance(out, tuple) else q(out)

    return hook


class Quantizers(nn.Module):
    """Every static activation quantizer of a model, keyed "block/module:where"."""

    def __init__(self, model: nn.Module, cfg: StaticConfig):
        super().__init__()
        spec = arch_for(model)
        if not spec.act_points:
            raise EdgequantError(
                f"integer-only quantization has no precision map for {spec.name} models"
            )
        self.cfg = cfg
        self.quant = nn.ModuleDict()
        self._handles: list = []
        self._attn: list[nn.Module] = []
        self._model = [model]  # a list: not a submodule
        self._impl = model.config._attn_implementation
        _register_attention()
        for i, block in enumerate(blocks_of(model, spec)):
            self._attach_block(i, block, spec)
        model.set_attn_implementation(ATTN_IMPL)

    def _attach_block(self, i: int, block: nn.Module, spec: ArchSpec) -> None:
        inner: dict[str, dict[str, ActQuant]] = {}
        for p in spec.act_points:
            name = f"{i}/{p.key}"
            q = ActQuant(point_bits(p, self.cfg), name, next(block.parameters()).device)
            self.quant[name.replace(".", "_")] = q
            mod = block.get_submodule(p.module)
            if p.where == "in":
                self._handles.append(mod.register_forward_pre_hook(_in_hook(q)))
            elif p.where == "out":
                self._handles.append(mod.register_forward_hook(_out_hook(q)))
            else:
                inner.setdefault(p.module, {})[p.where] = q
        for path, qs in inner.items():
            mod = block.get_submodule(path)
            mod._edgequant_static = qs
            self._attn.append(mod)

    def set_mode(self, mode: str) -> None:
        for q in self.quant.values():
            q.mode = mode

    def freeze(self) -> None:
        """Check that every range was observed and is finite, then start quantizing."""
        for q in self.quant.values():
            if not (torch.isfinite(q.lo) and torch.isfinite(q.hi)):
                raise EdgequantError(
                    f"activation range at block {q.name} is {q.lo.item()}..{q.hi.item()}: "
                    "never observed, or the calibration activations hold NaN/inf"
                )
        self.set_mode("quant")

    def table(self) -> dict[str, dict]:
        """The range table: per point its bits and [lo, hi]."""
        return {q.name: q.range() for q in self.quant.values()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for mod in self._attn:
            del mod._edgequant_static
        self._handles, self._attn = [], []
        self._model[0].set_attn_implementation(self._impl)

    @contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        before = {k: q.mode for k, q in self.quant.items()}
        self.set_mode(mode)
        try:
            yield
        finally:
            for k, q in self.quant.items():
                q.mode = before[k]


def weight_config(name: str, spec: ArchSpec, cfg: StaticConfig) -> tuple[QuantConfig, bool]:
    """The grid of one linear's weight: (quantizer, per-channel?)."""
    per_channel = cfg.w_bits == 4 or name in spec.w8_per_channel
    symmetric = cfg.w_symmetric and cfg.w_bits == 4
    return QuantConfig(cfg.w_bits, -1, zero_point=not symmetric), per_channel


def static_weight(w: torch.Tensor, qcfg: QuantConfig, per_channel: bool) -> torch.Tensor:
    # w [out, in] -> fake-quantized [out, in] float32, one range per row or per tensor
    if per_channel:
        return fake_quantize(w, qcfg)[0]
    return fake_quantize(w.reshape(1, -1), qcfg)[0].reshape(w.shape)


@torch.no_grad()
def quantize_weights(model: nn.Module, cfg: StaticConfig) -> None:
    """Round every block linear of the precision map's model onto its static weight grid."""
    spec = arch_for(model)
    names = [n for g in spec.groups for n in g.linears]
    for block in blocks_of(model, spec):
        for name in names:
            lin = block.get_submodule(name)
            qcfg, per_channel = weight_config(name, spec, cfg)
            lin.weight.copy_(static_weight(lin.weight.float(), qcfg, per_channel))


# the range setting each method takes unless StaticConfig.ranges names one: plain static RTN
# keeps min/max (the baseline as specified); SmoothQuant and MobileQuant start from mse
METHOD_RANGES = {"static-rtn": "minmax", "smoothquant": "mse", "mobilequant": "mse"}


def range_setting(cfg: StaticConfig, method: str) -> str:
    """How `method` sets activation ranges under `cfg`: its own default unless cfg names one."""
    return cfg.ranges or METHOD_RANGES[method]


FLOAT_BINS = 1 << 14  # per sign: float32 exponent and top 6 mantissa bits, 1.6 % wide at most


def float_histogram(x: torch.Tensor) -> torch.Tensor:
    # x [...] -> int64 counts [2, FLOAT_BINS] of its negative and positive values by magnitude,
    # ascending: the bins are the float32 bit patterns cut to sign, exponent and 6 mantissa
    # bits, so one bincount holds any range, 64 bins per doubling of magnitude
    code = (x.detach().float().flatten().view(torch.int32) >> 17) & (2 * FLOAT_BINS - 1)
    counts = torch.bincount(code, minlength=2 * FLOAT_BINS).view(2, FLOAT_BINS)
    return counts.flip(0)  # sign bit set (negative) first


def bin_centres() -> torch.Tensor:
    # -> [FLOAT_BINS] float64 magnitude at the centre of each bin; 0 for zeros, subnormals
    # and inf / NaN (exponent 0 or 255), whose counts the search leaves out
    k = torch.arange(FLOAT_BINS, dtype=torch.float64)
    exp, mant = torch.div(k, 64, rounding_mode="floor"), k % 64
    mags = torch.exp2(exp - 127) * (1 + (mant + 0.5) / 64)
    return torch.where((exp > 0) & (exp < 255), mags, torch.zeros_like(mags))


def least_error_range(
    counts: torch.Tensor, bits: int = 8, grid: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    # counts [2, FLOAT_BINS] a point's float histogram -> (lo, hi) scalars: among the min / max
    # shrunk towards 0 in `grid` steps per side, the static range of least squared error:
    # values outside are clipped to it, values within half a step of 0 round to 0 (0 is on
    # the grid), the others cost step^2 / 12 of rounding
    mags = bin_centres()
    v = torch.cat([-mags.flip(0), mags])  # [2 FLOAT_BINS] ascending
    w = torch.cat([counts[0].flip(0), counts[1]]).double().cpu() * (v != 0)
    zero = v.new_zeros(1)
    held = v[w > 0]
    if not len(held):  # nothing but zeros
        return zero[0].float(), zero[0].float()
    cw, c1, c2 = (torch.cat([zero, (w * v**k).cumsum(0)]) for k in range(3))  # [2 FLOAT_BINS + 1]
    c = torch.arange(grid, 0, -1, dtype=v.dtype) / grid  # 1 .. 1/grid
    los, his = held.min().clamp(max=0) * c, held.max().clamp(min=0) * c  # [grid] each
    below, upto = torch.searchsorted(v, los), torch.searchsorted(v, his, right=True)
    clip_lo = c2[below] - 2 * los * c1[below] + los.pow(2) * cw[below]  # sum w (v - lo)^2
    n = len(v)
    clip_hi = (c2[n] - c2[upto]) - 2 * his * (c1[n] - c1[upto]) + his.pow(2) * (cw[n] - cw[upto])
    step = (his[None, :] - los[:, None]) / (2**bits - 1)  # [grid lo, grid hi]
    a, b = torch.searchsorted(v, -step / 2), torch.searchsorted(v, step / 2)  # rounds to 0
    inside = cw[upto][None, :] - cw[below][:, None] - (cw[b] - cw[a])
    err = clip_lo[:, None] + clip_hi[None, :] + inside * step.pow(2) / 12 + (c2[b] - c2[a])
    i, j = divmod(int(err.argmin()), grid)
    return los[i].float(), his[j].float()


def histograms(qs: Quantizers) -> tuple[dict, list]:
    """Hooks that add what each 8-bit point sees to its float histogram (on its device)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, q in qs.quant.items():
        if q.bits != 8:
            continue

        def hook(mod, args, out, name=name):
            h = float_histogram(args[0])
            seen[name] = seen[name] + h if name in seen else h

        handles.append(q.register_forward_hook(hook))
    return seen, handles


@torch.no_grad()
def observe_ranges(
    model: nn.Module,
    qs: Quantizers,
    input_ids: torch.Tensor,
    batch: int = 8,
    ranges: str = "minmax",
):
    """Run the calibration ids [N, T] through the model with every quantizer observing.

    ranges "minmax": each point's range is the min / max of what it saw. "mse": 8-bit points
    take the range of least squared rounding plus clipping error (`least_error_range`) over a
    histogram of everything they saw, so a long tail no longer stretches the step for every
    other value; 16-bit points keep min / max (their step is already fine, and the residual
    stream's largest channels must not be clipped).
    """
    if ranges not in RANGES:
        raise EdgequantError(f"activation ranges must be one of {RANGES}, got {ranges!r}")
    model.eval()
    seen, handles = histograms(qs) if ranges == "mse" else ({}, [])
    try:
        with qs.mode("observe"):
            for start in tqdm(range(0, len(input_ids), batch), desc="ranges", unit="batch"):
                model(input_ids[start : start + batch], use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    qs.freeze()
    least_error_ranges(qs, seen)


@torch.no_grad()
def least_error_ranges(qs: Quantizers, seen: dict[str, torch.Tensor]) -> None:
    """Narrow each point with a histogram to its range of least squared error."""
    for name, counts in seen.items():
        q = qs.quant[name]
        lo, hi = least_error_range(counts, q.bits)
        # within the observed min / max (bin centres may lie a little beyond them)
        q.lo.clamp_(min=lo.item() / q.unit.item())
        q.hi.clamp_(max=hi.item() / q.unit.item())
