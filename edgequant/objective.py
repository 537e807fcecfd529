"""MobileQuant's training objective: the error of the last hidden state (the final norm's
output, what the lm_head reads) against the float model's on the same windows.

Two metrics (MobileQuantConfig.loss):
- "hidden": the plain mean squared error. A few channels carry most of the last hidden
  state's energy (in a calibration window of Gemma-3-270M, 10 of 640 channels carry half of
  it; in SmolLM2-135M one of 576 carries 38 %), so this loss spends the training on them,
  whether the predictions depend on them or not.
- "fisher": the second-order term of KL(p_float || p_quant), the divergence of the
  next-token distributions. With e the hidden-state error, the logits move by W e
  (W [V, H]: the lm_head), and KL ~= 1/2 e^T F e, F = W^T (diag(p) - p p^T) W, the Fisher
  information of the float prediction p. F is averaged over a token sample of the float
  model once; training then minimises ||e R||^2 with R R^T = F / 2, as cheap as the plain
  MSE. The loss reads as nats per token (to second order). The logits are taken uncapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgequant.arch import ArchSpec
from edgequant.config import LOSSES
from edgequant.errors import EdgequantError

FISHER_TOKENS = 2048  # tokens of the float model's predictions that F is averaged over
_TOKEN_CHUNK = 256  # tokens per [chunk, V] block of probabilities
_VOCAB_CHUNK = 16384  # lm_head rows per [chunk, H] block of the weighted second moment


class _Stop(Exception):
    pass


def last_hidden(model: nn.Module, spec: ArchSpec, ids: torch.Tensor) -> torch.Tensor:
    # ids [B, T] -> [B, T, H], the final norm's output (the model's lm_head never runs)
    caught = []

    def hook(module, args, out):
        caught.append(out)
        raise _Stop

    norm = model.get_submodule(spec.decode.final_norm)
    handle = norm.register_forward_hook(hook)
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught[0].float()


@torch.no_grad()
def fisher_basis(head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    # head [V, H] lm_head weight, hidden [M, H] float last hidden states -> R [H, H] with
    # R R^T = mean over the M tokens of W^T (diag(p) - p p^T) W / 2, p = softmax(hidden W^T)
    w = head.float()
    p_sum = torch.zeros(w.shape[0], device=w.device)
    mean_outer = torch.zeros(w.shape[1], w.shape[1], device=w.device, dtype=torch.float64)
    for s in range(0, len(hidden), _TOKEN_CHUNK):
        p = torch.softmax(hidden[s : s + _TOKEN_CHUNK].float() @ w.T, dim=-1)  # [chunk, V]
        p_sum += p.sum(0)
        mu = (p @ w).double()  # [chunk, H]: the expected lm_head row
        mean_outer += mu.T @ mu
    second = torch.zeros_like(mean_outer)  # sum_v p_sum[v] w_v w_v^T, in float64
    for s in range(0, len(w), _VOCAB_CHUNK):
        rows = w[s : s + _VOCAB_CHUNK].double()
        second += rows.T @ (rows * p_sum[s : s + _VOCAB_CHUNK, None].double())
    lam, u = torch.linalg.eigh((second - mean_outer) / (2 * len(hidden)))
    return (u * lam.clamp(min=0).sqrt()).float()


@dataclass(frozen=True)
class Objective:
    """The loss: mean squared error of the last hidden state, in `basis` (None: as is)."""

    spec: ArchSpec
    basis: torch.Tensor | None = None  # [H, H]

    def hidden(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        # ids [B, T] -> [B, T, H] the last hidden state in the loss's basis
        h = last_hidden(model, self.spec, ids)
        return h if self.basis is None else h @ self.basis

    @torch.no_grad()
    def targets(self, model: nn.Module, ids: torch.Tensor, batch: int) -> torch.Tensor:
        # ids [N, T] -> [N, T, H] the float model's, in the basis
        return torch.cat(
            [self.hidden(model, ids[k : k + batch]) for k in range(0, len(ids), batch)]
        )

    def loss(self, model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # ids [B, T], targets [B, T, H] -> scalar, differentiable
        return F.mse_loss(self.hidden(model, ids), targets) * self._per_token

    @torch.no_grad()
    def mean(self, model: nn.Module, ids: torch.Tensor, targets, batch: int) -> float:
        # ids [N, T], targets [N, T, H] -> the loss over all N windows
        total = 0.0
        for k in range(0, len(ids), batch):
            out = self.hidden(model, ids[k : k + batch])
            total += F.mse_loss(out, targets[k : k + batch], reduction="sum").item()
        return total / targets.numel() * self._per_token

    @property
    def _per_token(self) -> float:
        # fisher sums over the hidden channels (nats per token); hidden averages them
        return 1.0 if self.basis is None else float(self.basis.shape[1])


def objective(
    model: nn.Module, spec: ArchSpec, loss: str, ids: torch.Tensor, batch: int = 4
) -> Objective:
    """The Objective named `loss`; "fisher" averages F over the float model's predictions on
    about FISHER_TOKENS tokens of the windows `ids` [N, T] (evenly spaced windows)."""
    if loss not in LOSSES:
        raise EdgequantError(f"unknown loss {loss!r}; choose from {LOSSES}")
    if loss == "hidden":
        return Objective(spec)
    n = min(len(ids), -(-FISHER_TOKENS // ids.shape[1]))
    sample = ids[[k * len(ids) // n for k in range(n)]]
    hidden = Objective(spec).targets(model, sample, batch)  # [n, T, H] as they are
    head = model.get_output_embeddings().weight
    return Objective(spec, fisher_basis(head, hidden.reshape(-1, hidden.shape[-1])))
