"""MobileQuant (Tan et al., 2024): integer-only W8A8 / W4A8, learned end to end.

Starting from SmoothQuant, three kinds of parameters are trained jointly through the whole
fake-quantized model: the equivalent-transformation scales of SmoothQuant's pairs (each a
per-channel s dividing the previous op's output and multiplying the group's weight columns),
the weight clipping (sigmoid(logit) times the weight's min and max) and the static
activation ranges (8-bit points; 16-bit ones too with learn_a16). Weights are parametrized
(torch.nn.utils.parametrize), so the float weights stay untouched until `bake` writes the
learned, quantized ones. The loss compares the last hidden state (after the final norm)
with the float model's on the same calibration windows (edgequant.objective).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from edgequant.arch import ArchSpec, arch_for, blocks_of, fold_index
from edgequant.config import MobileQuantConfig, QuantConfig, StaticConfig
from edgequant.errors import EdgequantError
from edgequant.io import atomic_path
from edgequant.objective import objective
from edgequant.primitives import fake_quant_static, fake_quant_sym, least_error_clip
from edgequant.static import Quantizers, observe_ranges, range_setting, weight_config

CLIP_GRID = 29  # clipping ratios searched, from sigmoid(clip_init) down to 30 % of it
MOMENT_WINDOWS = 8  # calibration windows whose linear inputs weight the "output" search


def clip_logits(
    w: torch.Tensor, qcfg: QuantConfig, per_channel: bool, mcfg: MobileQuantConfig, x2=None
) -> torch.Tensor:
    # w [out, in] weight, x2 [in] mean square of its input or None -> [rows, 1] clipping
    # logits (rows: out with per-channel clipping, else 1) at the ratio of least squared
    # rounding error, each input column's error weighted by x2 (the output error, to first
    # order, without the columns' cross terms); the grid's top ratio keeps clip_init exactly
    top = torch.sigmoid(torch.tensor(mcfg.clip_init, dtype=torch.float64)).item()
    ratios = top * torch.linspace(1.0, 0.3, CLIP_GRID, device=w.device)
    flat = w if per_channel else w.reshape(1, -1)
    weight = None if x2 is None else (x2 if per_channel else x2.repeat(w.shape[0]))
    per_row = per_channel and mcfg.clip_per_channel
    r = least_error_clip(flat, qcfg.bits, qcfg.zero_point, ratios, per_row, weight)
    return torch.where(r >= ratios[0], mcfg.clip_init, torch.logit(r.clamp(max=ratios[0])))


class EffectiveWeight(nn.Module):
    """A linear's weight as trained: (w * s_in) / s_out, clipped, on its static grid."""

    def __init__(self, w: torch.Tensor, qcfg: QuantConfig, per_channel: bool, mcfg, logit=None):
        # logit [rows, 1] where the clipping starts (None: clip_init)
        super().__init__()
        self.qcfg, self.per_channel, self.min_scale = qcfg, per_channel, mcfg.min_scale
        rows = w.shape[0] if per_channel and mcfg.clip_per_channel else 1
        if logit is None:
            logit = torch.full((rows, 1), mcfg.clip_init, device=w.device)
        self.lo_logit = nn.Parameter(logit.clone())
        self.hi_logit = nn.Parameter(logit.clone())
        self.s_in: nn.Parameter | None = None  # shared with the group; set by `attach`
        self.s_out: nn.Parameter | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # w [out, in] float weight -> [out, in] fake-quantized effective weight
        if self.s_in is not None:
            w = w * self.s_in.clamp(min=self.min_scale)
        if self.s_out is not None:
            w = w / self.s_out.clamp(min=self.min_scale).unsqueeze(1)
        flat = w if self.per_channel else w.reshape(1, -1)
        if self.qcfg.zero_point:
            lo = torch.sigmoid(self.lo_logit) * flat.amin(1, keepdim=True)
            hi = torch.sigmoid(self.hi_logit) * flat.amax(1, keepdim=True)
            q = fake_quant_static(flat, lo, hi, self.qcfg.bits)
        else:
            amax = torch.sigmoid(self.hi_logit) * flat.abs().amax(1, keepdim=True)
            q = fake_quant_sym(flat, amax, self.qcfg.bits)
        return q.reshape(w.shape)


class EffectiveNorm(nn.Module):
    """A norm's weight with the scale of the group it feeds folded in (w / s, or 1+w form)."""

    def __init__(self, s: nn.Parameter, kind: str, min_scale: float):
        super().__init__()
        if kind not in ("rms", "rms_one_plus"):
            raise EdgequantError(f"MobileQuant cannot fold scales into {kind} norms")
        self.s, self.kind, self.min_scale = s, kind, min_scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # w [C] -> [C]
        s = self.s.clamp(min=self.min_scale)
        return (1.0 + w) / s - 1.0 if self.kind == "rms_one_plus" else w / s


class DividedBy(nn.Module):
    """A bias divided by the scale of the group its layer feeds: b / s."""

    def __init__(self, s: nn.Parameter, min_scale: float):
        super().__init__()
        self.s, self.min_scale = s, min_scale

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        # b [C] -> [C]
        return b / self.s.clamp(min=self.min_scale)


class Learnables(nn.Module):
    """The trained parameters: scales per (block, group), clip logits per linear."""

    def __init__(self):
        super().__init__()
        self.scales = nn.ParameterDict()
        self.weights = nn.ModuleDict()  # "block/linear" -> EffectiveWeight

    def groups(self, ranges: list[nn.Parameter], mcfg: MobileQuantConfig) -> list[dict]:
        clips = [p for w in self.weights.values() for p in (w.lo_logit, w.hi_logit)]
        return [
            {"params": list(self.scales.values()), "lr": mcfg.lr_scale},
            {"params": clips, "lr": mcfg.lr_clip},
            {"params": ranges, "lr": mcfg.lr_range},
        ]


def attach(
    model: nn.Module,
    spec: ArchSpec,
    scfg: StaticConfig,
    mcfg: MobileQuantConfig,
    search: bool = False,
    x2: dict | None = None,
):
    """Parametrize every block linear (and the norms that feed a group) -> Learnables.

    With `search`, the clipping starts where mcfg.clip_search puts it ("output" needs `x2`:
    "block/linear" -> mean square of its input [in], see input_moments); else at clip_init
    (a saved state is about to overwrite it)."""
    learn = Learnables()
    for i, block in enumerate(blocks_of(model, spec)):
        for g in spec.groups:
            for name in g.linears:
                lin = block.get_submodule(name)
                qcfg, per_channel = weight_config(name, spec, scfg)
                key, logit = f"{i}/{name}".replace(".", "_"), None
                if search and mcfg.clip_search != "off":
                    x2_in = x2[key] if mcfg.clip_search == "output" else None
                    logit = clip_logits(lin.weight, qcfg, per_channel, mcfg, x2_in)
                learn.weights[key] = EffectiveWeight(lin.weight, qcfg, per_channel, mcfg, logit)
        for g in spec.groups:
            if fold_index(block, g, gqa=False) is None:
                continue
            c = block.get_submodule(g.linears[0]).in_features
            dev = block.get_submodule(g.linears[0]).weight.device
            s = learn.scales[f"{i}/{g.name}"] = nn.Parameter(torch.ones(c, device=dev))
            for name in g.linears:
                learn.weights[f"{i}/{name}".replace(".", "_")].s_in = s
            prev = block.get_submodule(g.prev)
            if isinstance(prev, nn.Linear):
                learn.weights[f"{i}/{g.prev}".replace(".", "_")].s_out = s
                if prev.bias is not None:  # the output channel's bias scales with it
                    parametrize.register_parametrization(prev, "bias", DividedBy(s, mcfg.min_scale))
            else:
                parametrize.register_parametrization(
                    prev, "weight", EffectiveNorm(s, spec.norm, mcfg.min_scale)
                )
        for g in spec.groups:
            for name in g.linears:
                eff = learn.weights[f"{i}/{name}".replace(".", "_")]
                parametrize.register_parametrization(block.get_submodule(name), "weight", eff)
    return learn


@torch.no_grad()
def input_moments(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, batch: int) -> dict:
    # ids [N, T] -> {"block/linear": [in] mean square of the linear's input over N x T tokens}
    sums, handles = {}, []
    for i, block in enumerate(blocks_of(model, spec)):
        for name in [n for g in spec.groups for n in g.linears]:
            key = f"{i}/{name}".replace(".", "_")

            def hook(module, args, out, key=key):
                x = args[0].detach().float()
                sums[key] = sums.get(key, 0.0) + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

            handles.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        for k in range(0, len(ids), batch):
            model(ids[k : k + batch], use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return {k: v / ids.numel() for k, v in sums.items()}


def bake(model: nn.Module, keep: bool = True) -> None:
    """Drop every parametrization: keep=True writes the learned effective values, False
    restores the float tensors they were computed from."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=keep)


# MobileQuantConfig knobs added later -> what older states ran with
LEGACY = {"windows": 0, "learn_a16": True, "loss": "hidden", "clip_search": "off"}
STATIC_LEGACY = {"ranges": "minmax", "calib_bos": False}  # the same for StaticConfig


def static_record(cfg: StaticConfig) -> dict:
    """The static configuration as a state records it: the range setting resolved."""
    return asdict(cfg) | {"ranges": range_setting(cfg, "mobilequant")}


def _spaced(n: int, k: int) -> list[int]:
    # k evenly spaced indices of range(n) (k <= n)
    return [i * n // k for i in range(k)]


def training_windows(input_ids: torch.Tensor, windows: int) -> torch.Tensor:
    # input_ids [N, T] -> [min(windows, N), T], evenly spaced (windows 0: all N)
    n = len(input_ids)
    if windows <= 0 or windows >= n:
        return input_ids
    return input_ids[_spaced(n, windows)]


def heldout_windows(input_ids: torch.Tensor, windows: int, count: int = 8) -> torch.Tensor:
    # input_ids [N, T] -> [<= count, T]: evenly spaced windows that training_windows leaves
    # out ([0, T] when training takes every window)
    n = len(input_ids)
    if windows <= 0 or windows >= n:
        return input_ids[:0]
    used = set(_spaced(n, windows))
    rest = [i for i in range(n) if i not in used]
    return input_ids[[rest[i] for i in _spaced(len(rest), min(count, len(rest)))]]


def _report_heldout(held: dict, state_path) -> None:
    """Say whether training lowered the loss on calibration windows it did not train on (and
    add the check to a saved state)."""
    steps = (
        "" if held["steps"] == held["total"] else f" after {held['steps']} of {held['total']} steps"
    )
    msg = (
        f"mobilequant: loss on {held['windows']} calibration windows not trained on "
        f"{held['start']:.4g} -> {held['end']:.4g}{steps}"
    )
    if held["end"] > held["start"]:
        msg += (
            ": training raised it; lower learning rates (--lr-scale/--lr-clip/--lr-range) may help"
        )
    tqdm.write(msg)
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        _save(state_path, {**state, "heldout": held})


def _steps(windows: int, mcfg: MobileQuantConfig) -> tuple[int, int]:
    """(steps per epoch, steps in all) of a training on `windows` calibration windows."""
    per_epoch = math.ceil(windows / mcfg.batch)
    return per_epoch, mcfg.epochs * per_epoch


def _state(step, learn, qs, opt, sched, mcfg, losses) -> dict:
    return {
        "step": step,
        "learnables": learn.state_dict(),
        "ranges": qs.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "config": asdict(mcfg),
        "static": static_record(qs.cfg),
        "losses": losses,
    }


def _save(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path, learn, qs, mcfg, device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise EdgequantError(f"cannot read MobileQuant state {path}: {e}") from None
    # states saved before a knob existed ran with its neutral value
    saved, now = {**LEGACY, **state.get("config", {})}, asdict(mcfg)
    if saved != now:
        diff = ", ".join(
            f"{k}={saved.get(k)} (now {v})" for k, v in now.items() if saved.get(k) != v
        )
        raise EdgequantError(f"{path} was saved with another MobileQuant configuration: {diff}")
    static = static_record(qs.cfg)
    if {**STATIC_LEGACY, **state.get("static", static)} != static:
        hint = " (states from before --ranges: --alpha search --ranges minmax)"
        hint = hint if "ranges" not in state.get("static", {}) else ""
        raise EdgequantError(
            f"{path} was saved with another static configuration: {state.get('static')}{hint}"
        )
    learn.load_state_dict(state["learnables"])
    qs.load_state_dict(state["ranges"])
    return state


def _resume(path, learn, qs, opt, sched, mcfg, device) -> tuple[int, list]:
    state = _load_state(path, learn, qs, mcfg, device)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state["step"], state["losses"]


def train(
    model: nn.Module,
    input_ids: torch.Tensor,
    scfg: StaticConfig,
    mcfg: MobileQuantConfig,
    state_path=None,
    max_steps: int | None = None,
) -> tuple[Quantizers, list[float]]:
    """Learn MobileQuant's parameters on calibration ids [N, T] (model already smoothed).

    Resumes from `state_path` when it exists (same configuration), saves there every
    `save_every` steps; `max_steps` stops early (the state is saved). When training takes a
    subset of the windows, up to 8 of the others check it: their loss before and after
    training is reported (and added to a saved state as "heldout"). Their activations did
    count towards the starting ranges, observed on every window. At the end the weights are
    baked; returns the quantizers (ranges as trained, quantizing) and the loss per step.
    If training fails, the model is left as it came (float weights, no quantizers).
    """
    spec = arch_for(model)
    if spec.decode is None or not spec.act_points:
        raise EdgequantError(f"MobileQuant has no precision map for {spec.name} models")
    for p in model.parameters():
        p.requires_grad_(False)
    train_ids = training_windows(input_ids, mcfg.windows)
    obj = objective(model, spec, mcfg.loss, train_ids, mcfg.batch)
    targets = obj.targets(model, train_ids, mcfg.batch)
    held_ids = heldout_windows(input_ids, mcfg.windows)
    held_targets = obj.targets(model, held_ids, mcfg.batch) if len(held_ids) else None
    search = state_path is None or not state_path.is_file()  # else the state brings it
    x2 = None
    if search and mcfg.clip_search == "output":
        x2 = input_moments(model, spec, train_ids[:MOMENT_WINDOWS], mcfg.batch)
    learn = attach(model, spec, scfg, mcfg, search, x2)
    qs = Quantizers(model, scfg)
    held = None
    try:
        with parametrize.cached():  # the weights do not change while ranges are observed
            ranges = range_setting(scfg, "mobilequant")
            observe_ranges(model, qs, input_ids, mcfg.batch, ranges)  # on every window
        if held_targets is not None:
            start = obj.mean(model, held_ids, held_targets, mcfg.batch)
        losses = _fit(model, obj, train_ids, targets, learn, qs, mcfg, state_path, max_steps)
        if held_targets is not None:
            end = obj.mean(model, held_ids, held_targets, mcfg.batch)
            held = {"windows": len(held_ids), "start": start, "end": end}
            held |= {"steps": len(losses), "total": _steps(len(train_ids), mcfg)[1]}
    except BaseException:
        bake(model, keep=False)
        qs.remove()
        raise
    with torch.no_grad():
        bake(model)
    if held is not None:
        _report_heldout(held, state_path)
    for q in qs.quant.values():
        q.lo.requires_grad_(False)
        q.hi.requires_grad_(False)
        q.relative(False)
    return qs, losses


def _fit(model, obj, input_ids, targets, learn, qs, mcfg, state_path, max_steps) -> list:
    """The training loop (see `train`); returns the loss of every step, resumed ones included."""
    ranges = []
    for q in qs.quant.values():
        if q.bits < 16 or mcfg.learn_a16:  # the others keep their observed range bit for bit
            q.relative(True)
            ranges += [q.lo.requires_grad_(True), q.hi.requires_grad_(True)]
    opt = torch.optim.AdamW(learn.groups(ranges, mcfg), weight_decay=0.0)
    per_epoch, total = _steps(len(input_ids), mcfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total))
    )
    step, losses = 0, []
    if state_path is not None and state_path.is_file():
        device = input_ids.device
        step, losses = _resume(state_path, learn, qs, opt, sched, mcfg, device)
    stop = total if max_steps is None else min(total, max_steps)
    bar = tqdm(range(step, stop), initial=step, total=total, desc="mobilequant", unit="step")
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        gen = torch.Generator().manual_seed(mcfg.seed + epoch)
        b = torch.randperm(len(input_ids), generator=gen)[k * mcfg.batch : (k + 1) * mcfg.batch]
        loss = obj.loss(model, input_ids[b], targets[b])
        if not torch.isfinite(loss):
            raise EdgequantError(f"MobileQuant loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if state_path is not None and ((step + 1) % mcfg.save_every == 0 or step + 1 == stop):
            _save(state_path, _state(step + 1, learn, qs, opt, sched, mcfg, losses))
    return losses


def apply_trained(model: nn.Module, scfg: StaticConfig, mcfg: MobileQuantConfig, state_path):
    """Re-apply a saved training state to the smoothed float model it was trained from.

    The weights are baked and every range set as trained; returns the quantizers, quantizing.
    """
    spec = arch_for(model)
    learn = attach(model, spec, scfg, mcfg)
    qs = Quantizers(model, scfg)
    _load_state(state_path, learn, qs, mcfg, next(model.parameters()).device)
    with torch.no_grad():
        bake(model)
    for q in qs.quant.values():
        q.relative(False)
    qs.freeze()
    return qs
