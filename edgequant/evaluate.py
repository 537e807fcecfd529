"""Perplexity under one stated protocol.

Non-overlapping windows of `window` tokens (capped at the model's context). Where the
tokenizer itself prepends BOS, each window is BOS + (window - 1) text tokens and the first
text token is scored too; otherwise the first token of each window is context only.
The result is exp(mean next-token cross-entropy) over all scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edgequant.data import bos_prefix
from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # scored tokens
    windows: int
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def windows(
    model: nn.Module, tokenizer, ids: torch.Tensor, window: int, max_windows: int | None
) -> tuple[list[torch.Tensor], str]:
    # ids [L] text token ids -> ([1, W] window inputs, protocol prefix)
    ctx = context_length(model)
    window = min(window, ctx) if ctx else window
    bos = bos_prefix(tokenizer)
    body = window - (1 if bos is not None else 0)
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise EdgequantError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window ({body})"
        )
    out = []
    for k in range(n):
        chunk = ids[k * body : (k + 1) * body]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        out.append(chunk.unsqueeze(0))
    protocol = f"{n} non-overlapping windows of {window} tokens" + (
        " (BOS + text)" if bos is not None else " (no BOS; first token of a window is context)"
    )
    return out, protocol


def next_token_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # x [1, W] -> float32 logits [W - 1, V] predicting x[0, 1:]
    device = next(model.parameters()).device
    return model(x.to(device), use_cache=False).logits[0, :-1].float().cpu()


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    ids: torch.Tensor,
    window: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> Perplexity:
    # ids [L] text token ids -> Perplexity over non-overlapping windows
    xs, protocol = windows(model, tokenizer, ids, window, max_windows)
    total, count = 0.0, 0
    for k, x in enumerate(tqdm(xs, desc="perplexity", unit="window", disable=not progress)):
        nll = F.cross_entropy(next_token_logits(model, x), x[0, 1:], reduction="sum").item()
        if not math.isfinite(nll):
            raise EdgequantError(f"non-finite loss in perplexity window {k}")
        total += nll
        count += x.shape[1] - 1
    protocol += f", mean next-token cross-entropy over {count} tokens"
    return Perplexity(math.exp(total / count), total / count, count, len(xs), protocol)


@dataclass(frozen=True)
class Fidelity:
    """How closely a model's next-token distributions follow a reference (float) model's."""

    kl: float  # mean KL(reference || model) per scored token, nats
    top1: float  # fraction of tokens where both models' most likely next token agree
    ppl: float
    ref_ppl: float
    ppl_ratio: float  # ppl / ref_ppl
    tokens: int
    windows: int
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


def window_fidelity(logits: torch.Tensor, ref: torch.Tensor, target: torch.Tensor, rows=256):
    # logits, ref [W, V] float32, target [W] -> sums over W: KL(ref || logits), argmax
    # agreement, nll of logits, nll of ref
    kl = agree = nll = ref_nll = 0.0
    for a, b, t in zip(logits.split(rows), ref.split(rows), target.split(rows), strict=True):
        la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        kl += (lb.exp() * (lb - la)).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        nll -= la.gather(1, t[:, None]).sum().item()
        ref_nll -= lb.gather(1, t[:, None]).sum().item()
    return kl, agree, nll, ref_nll


@torch.no_grad()
def fidelity(
    model: nn.Module,
    reference: nn.Module,
    tokenizer,
    ids: torch.Tensor,
    window: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> Fidelity:
    # ids [L] text token ids -> Fidelity of model against reference on the same windows
    xs, protocol = windows(model, tokenizer, ids, window, max_windows)
    kl = agree = nll = ref_nll = 0.0
    count = 0
    for k, x in enumerate(tqdm(xs, desc="fidelity", unit="window", disable=not progress)):
        got = window_fidelity(
            next_token_logits(model, x), next_token_logits(reference, x), x[0, 1:]
        )
        if not all(math.isfinite(v) for v in got):
            raise EdgequantError(f"non-finite logits in fidelity window {k}")
        kl, agree, nll, ref_nll = (
            s + v for s, v in zip((kl, agree, nll, ref_nll), got, strict=True)
        )
        count += x.shape[1] - 1
    ppl, ref_ppl = math.exp(nll / count), math.exp(ref_nll / count)
    protocol += f", KL(reference || model) and argmax agreement over {count} tokens"
    return Fidelity(
        kl / count, agree / count, ppl, ref_ppl, ppl / ref_ppl, count, len(xs), protocol
    )
