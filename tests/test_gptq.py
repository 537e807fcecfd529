import pytest
import torch
from conftest import FACTORIES

from edgequant.api import quantize_model
from edgequant.checkpoint import load_quantized, quantized_modules, save_quantized
from edgequant.config import AWQConfig, CalibConfig, QuantConfig
from edgequant.gptq import GPTQConfig, gptq_weight
from edgequant.primitives import fake_quantize, quantize


def correlated_layer(seed=0, n=4096, c=128, out=64, salient_last=False):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen) / c**0.5 + torch.eye(c)
    x = torch.randn(n, c, generator=gen) @ mix  # strongly correlated input channels
    # a few salient channels; last, plain column order reaches them only at the end
    x[:, -6:].mul_(10) if salient_last else x[:, :6].mul_(10)
    w = torch.randn(out, c, generator=gen) * 0.05
    return x, w


def out_error(x, w, wq):
    return (x @ (wq - w).T).pow(2).mean().item()


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (2, 32), (4, -1)])
@pytest.mark.parametrize("seed", range(2))
def test_gptq_beats_rtn_and_stays_on_grid(bits, group, seed):
    x, w = correlated_layer(seed)
    q = QuantConfig(bits, group)
    h = 2 * x.T @ x / x.shape[0]
    rtn = out_error(x, w, fake_quantize(w, q)[0])
    for act_order in (False, True):
        wq, s, z = gptq_weight(w, h, q, GPTQConfig(act_order=act_order))
        assert out_error(x, w, wq) < rtn
        # the result is exactly representable with its own group parameters
        codes = quantize(wq, s, z, q).float()
        k = q.group_len(128)
        deq = (codes - z.repeat_interleave(k, 1)) * s.repeat_interleave(k, 1)
        assert torch.allclose(deq, wq, atol=1e-6)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 32), (3, -1), (2, 32)])
def test_act_order_never_raises_error_on_test_layers(bits, group):
    q = QuantConfig(bits, group)
    for seed in range(3):
        x, w = correlated_layer(seed, salient_last=True)
        h = 2 * x.T @ x / x.shape[0]
        plain = out_error(x, w, gptq_weight(w, h, q, GPTQConfig())[0])
        ordered = out_error(x, w, gptq_weight(w, h, q, GPTQConfig(act_order=True))[0])
        assert ordered <= plain


def test_dead_channels_and_singular_hessian():
    x, w = correlated_layer(0, n=32)  # fewer samples than channels: H is singular
    x[:, 10:20] = 0  # dead input channels
    h = 2 * x.T @ x / x.shape[0]
    notes = []
    wq, s, z = gptq_weight(w, h, QuantConfig(4, 32), GPTQConfig(damp=0.0), notes, "toy")
    assert torch.isfinite(wq).all() and torch.isfinite(s).all()
    assert (wq[:, 10:20] == 0).all()
    assert any("dead input channels" in n for n in notes)
    assert any("damping raised" in n for n in notes)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_gptq_checkpoint_reproduces_logits(tmp_path, tokenizer, calib_file, method, arch):
    model = FACTORIES[arch](hidden=128)
    q = QuantConfig(3, 32)
    calib = CalibConfig(source=str(calib_file), n_samples=8, seqlen=32)
    g = GPTQConfig(act_order=arch == "opt")
    quantize_model(model, tokenizer, method, quant=q, calib=calib, awq=AWQConfig(), gptq=g)
    save_quantized(model, tokenizer, tmp_path / "ck", q, "edgequant")
    loaded = load_quantized(tmp_path / "ck")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert all(torch.isfinite(m.scale).all() for m in quantized_modules(loaded).values())
