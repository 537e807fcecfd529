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


def bos_prefix(tokenizer) -> int | None:
    """The BOS id if the tokenizer adds it on its own, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


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
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for k in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        chunk = ids[k * body : (k + 1) * body]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        x = chunk.unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        if not math.isfinite(nll):
            raise EdgequantError(f"non-finite loss in perplexity window {k}")
        total += nll
        count += x.shape[1] - 1
    protocol = (
        f"{n} non-overlapping windows of {window} tokens"
        + (" (BOS + text)" if bos is not None else " (no BOS; first token of a window is context)")
        + f", mean next-token cross-entropy over {count} tokens"
    )
    return Perplexity(math.exp(total / count), total / count, count, n, protocol)
