"""`edgequant quantize --method static-rtn|smoothquant|mobilequant`: integer-only W8A8 / W4A8."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgequant.errors import EdgequantError

# the parsed arguments that are StaticConfig / MobileQuantConfig fields of the same name
STATIC_ARGS = ("w_bits", "a_bits", "w_symmetric", "alpha", "ranges", "calib_bos")
MOBILEQUANT_ARGS = ("epochs", "batch", "windows", "lr_scale", "lr_clip", "lr_range", "learn_a16")
MOBILEQUANT_ARGS += ("loss", "clip_search", "seed")


def alpha_arg(text: str) -> float | None:
    """--alpha: a number, or "search" (None: grid-searched per scale group)."""
    return None if text == "search" else float(text)


def add_static_args(p) -> None:
    from edgequant.config import CLIP_SEARCHES, LOSSES, RANGES, MobileQuantConfig, StaticConfig

    d = MobileQuantConfig()
    g = p.add_argument_group("integer-only methods (static-rtn, smoothquant, mobilequant)")
    g.add_argument("--a-bits", type=int, default=8, help="8 (the precision map) or 16")
    g.add_argument("--w-symmetric", action="store_true", help="W4: signed per-channel grid")
    g.add_argument("--alpha", type=alpha_arg, default=StaticConfig().alpha,
                   help="SmoothQuant alpha, or 'search' per scale group")  # fmt: skip
    g.add_argument("--ranges", choices=RANGES,
                   help="activation ranges: minmax, or mse (least squared error at 8-bit "
                   "points); default: static-rtn minmax, the others mse")  # fmt: skip
    g.add_argument("--calib-bos", action=argparse.BooleanOptionalAction,
                   default=StaticConfig().calib_bos,
                   help="calibration windows start with BOS if the tokenizer adds it")  # fmt: skip
    g.add_argument("--epochs", type=int, default=d.epochs, help="MobileQuant training epochs")
    g.add_argument("--batch", type=int, default=d.batch, help="MobileQuant windows per step")
    g.add_argument("--windows", type=int, default=d.windows,
                   help="MobileQuant: calibration windows trained on (0: all)")  # fmt: skip
    lrs = {"scale": "equivalent-transformation scales", "clip": "weight clipping",
           "range": "activation ranges"}  # fmt: skip
    for name, what in lrs.items():
        g.add_argument(f"--lr-{name}", type=float, default=getattr(d, f"lr_{name}"),
                       help=f"MobileQuant learning rate of the {what}")  # fmt: skip
    g.add_argument("--learn-a16", action=argparse.BooleanOptionalAction, default=d.learn_a16,
                   help="MobileQuant: also learn the ranges of 16-bit points")  # fmt: skip
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="MobileQuant: last hidden state error weighted by the lm_head's "
                   "Fisher information (fisher) or plain MSE (hidden)")  # fmt: skip
    g.add_argument("--clip-search", choices=CLIP_SEARCHES, default=d.clip_search,
                   help="MobileQuant: weight clipping starts at the ratio of least output "
                   "(or weight) rounding error, or at sigmoid(4) (off)")  # fmt: skip
    g.add_argument("--state", metavar="FILE", help="MobileQuant: save / resume training here")


def cmd_quantize_static(a):
    """Quantize, optionally save; returns (model, tokenizer, summary) for --ppl / --json."""
    from edgequant.api import quantize_static
    from edgequant.config import CalibConfig, MobileQuantConfig, StaticConfig
    from edgequant.zoo import load

    cfg = StaticConfig(**{k: getattr(a, k) for k in STATIC_ARGS})
    mcfg = MobileQuantConfig(**{k: getattr(a, k) for k in MOBILEQUANT_ARGS})
    calib = CalibConfig(source=a.calib, n_samples=a.n_samples, seqlen=a.seqlen, seed=a.seed)
    if a.out and Path(a.out).exists():
        raise EdgequantError(f"output directory {a.out} already exists")
    model, tok = load(a.model)
    t0 = time.perf_counter()
    state = Path(a.state) if a.state else None
    qs, _ = quantize_static(model, tok, a.method, cfg, calib, mcfg, state)
    seconds = time.perf_counter() - t0
    print(f"quantized {a.model} with {a.method} w{cfg.w_bits}a{cfg.a_bits} in {seconds:.1f} s")
    if a.out:
        from edgequant.static_checkpoint import save_static

        save_static(model, qs, tok, Path(a.out))
        print(f"integer-only checkpoint written to {a.out}")
    summary = {
        "model": a.model,
        "method": a.method,
        "w_bits": cfg.w_bits,
        "a_bits": cfg.a_bits,
        "seconds": seconds,
    }
    return model, tok, summary
