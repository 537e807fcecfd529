import pytest
import torch
from conftest import FACTORIES

from edgequant.arch import arch_for
from edgequant.errors import EdgequantError
from edgequant.objective import fisher_basis, last_hidden, objective


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_fisher_basis_is_the_mean_fisher_information_over_two():
    w, h = torch.randn(40, 6, generator=_gen()), torch.randn(300, 6, generator=_gen(1))
    r = fisher_basis(w, h)
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for p in torch.softmax(h.double() @ w.double().T, -1):
        expected += w.double().T @ (torch.diag(p) - torch.outer(p, p)) @ w.double()
    expected /= 2 * len(h)
    assert torch.allclose((r @ r.T).double(), expected, atol=1e-5)


def test_fisher_loss_is_the_kl_of_the_predictions_to_second_order():
    # ||e R||^2 per token against KL(softmax(h W^T) || softmax((h + e) W^T)), small e
    w, h = torch.randn(50, 8, generator=_gen()), torch.randn(1, 8, generator=_gen(1))
    r = fisher_basis(w, h)
    e = 1e-2 * torch.randn(1, 8, generator=_gen(2))
    p = torch.log_softmax(h.double() @ w.double().T, -1)
    q = torch.log_softmax((h + e).double() @ w.double().T, -1)
    kl = (p.exp() * (p - q)).sum().item()
    assert (e @ r).pow(2).sum().item() == pytest.approx(kl, rel=0.05)


def test_the_loss_reads_as_nats_per_token_and_batches_agree():
    model = FACTORIES["llama"]()
    spec, ids = arch_for(model), torch.randint(0, 320, (6, 16), generator=_gen())
    obj = objective(model, spec, "fisher", ids)
    d = torch.randn(model.config.hidden_size, generator=_gen(1))  # one error on every token
    targets = obj.targets(model, ids, 4) - d @ obj.basis
    per_token = (d @ obj.basis).pow(2).sum().item()
    with torch.no_grad():
        assert obj.loss(model, ids, targets).item() == pytest.approx(per_token, rel=1e-4)
    assert obj.mean(model, ids, targets, 4) == pytest.approx(per_token, rel=1e-4)


def test_hidden_loss_is_plain_mse_and_unknown_losses_raise():
    model = FACTORIES["gemma3"]()
    spec, ids = arch_for(model), torch.randint(0, 320, (4, 8), generator=_gen())
    obj = objective(model, spec, "hidden", ids)
    assert obj.basis is None
    targets = torch.zeros(4, 8, model.config.hidden_size)
    with torch.no_grad():
        direct = last_hidden(model, spec, ids).pow(2).mean().item()
    assert obj.mean(model, ids, targets, 3) == pytest.approx(direct)
    with pytest.raises(EdgequantError, match="unknown loss 'kl'"):
        objective(model, spec, "kl", ids)
