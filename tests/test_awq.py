import json
import math

import pytest
import torch
from conftest import FACTORIES, llama

from edgequant.awq import (
    AWQSearch,
    awq_quantize,
    candidate_scale,
    chunk_subset,
    gram_error,
    row_sensitivity,
    search_scale,
)
from edgequant.calibrate import bf16_is_fast, bf16_linears
from edgequant.clip import clip_bounds
from edgequant.config import W3_LOSS_SAMPLES, AWQConfig, QuantConfig
from edgequant.errors import EdgequantError
from edgequant.gptq import GPTQConfig
from edgequant.primitives import fake_quantize, group_minmax
from edgequant.recipe import Recipe, apply_recipe


def outlier_layer(seed=0, n=2048, c=128, out=96):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen)
    x[:, :4] *= 40.0  # a few salient input channels, as in LLM activations
    w = torch.randn(out, c, generator=gen) * 0.05
    return x, w


def layer_error(x, w, wq):
    return (x @ (wq - w).T).pow(2).mean().item()


def test_scale_normalisation():
    x_mean = torch.rand(64) + 0.1
    for alpha in (0.0, 0.3, 0.95):
        s = candidate_scale(x_mean, None, alpha)
        assert math.isclose((s.max() * s.min()).item(), 1.0, rel_tol=1e-5)
    assert torch.allclose(candidate_scale(x_mean, None, 0.0), torch.ones(64))


def test_awq_beats_rtn_on_outlier_channels():
    x, w = outlier_layer()
    q = QuantConfig(3, 32)
    gram = x.T @ x
    rtn = gram_error(fake_quantize(w, q)[0] - w, gram, x.shape[0])

    def loss(s):
        return gram_error(fake_quantize(w * s, q)[0] / s - w, gram, x.shape[0])

    s, best = search_scale(x.abs().mean(0), None, loss, AWQConfig())
    assert best <= rtn
    # the salient channels get the largest scales, and the error drops a lot
    assert set(s.topk(4).indices.tolist()) == {0, 1, 2, 3}
    assert best < 0.6 * rtn
    # the Gram form equals the direct output error
    direct = layer_error(x, w, fake_quantize(w * s, q)[0] / s)
    assert math.isclose(best, direct, rel_tol=1e-3)


@pytest.mark.parametrize("form", ["sym", "asym"])
@pytest.mark.parametrize("bits,group", [(3, 32), (4, 64), (4, -1), (2, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_clip_never_raises_layer_error(form, bits, group, seed):
    x, w = outlier_layer(seed, n=512)
    w[torch.rand_like(w) < 0.01] *= 8  # weight outliers make clipping worthwhile
    q, a = QuantConfig(bits, group), AWQConfig(clip_form=form)
    b = clip_bounds(w, x, q, a)
    plain = layer_error(x, w, fake_quantize(w, q)[0])
    if b is not None:
        assert layer_error(x, w, fake_quantize(w, q, *b)[0]) <= plain * (1 + 1e-5)
        if form == "sym":  # symmetric, or a row left at its plain min/max
            wmin, wmax = group_minmax(w, q)
            sym = (b[0] == -b[1]).all(1)
            plain_row = ((b[0] == wmin) & (b[1] == wmax)).all(1)
            assert (sym | plain_row).all()


def test_clip_helps_with_weight_outliers():
    x, w = outlier_layer(1, n=512)
    w[torch.rand_like(w) < 0.02] *= 10
    q = QuantConfig(3, 32)
    b = clip_bounds(w, x, q, AWQConfig())
    assert b is not None
    assert layer_error(x, w, fake_quantize(w, q, *b)[0]) < layer_error(x, w, fake_quantize(w, q)[0])


def test_clip_checked_on_held_out_tokens():
    # the clip sample misses a rare huge activation on channel 0, whose weights are outliers
    x, w = outlier_layer(2, n=2048)
    x[:, 0] = 0.0
    x[1500:1510, 0] = 400.0
    w[:, 0] *= 6
    q, a = QuantConfig(3, 32), AWQConfig()
    sample = x[:512]
    blind = clip_bounds(w, sample, q, a)
    assert blind is not None
    plain = layer_error(x, w, fake_quantize(w, q)[0])
    assert layer_error(x, w, fake_quantize(w, q, *blind)[0]) > plain  # the trap is real
    checked = clip_bounds(w, sample, q, a, check=x.T @ x)
    if checked is not None:
        assert layer_error(x, w, fake_quantize(w, q, *checked)[0]) <= plain * (1 + 1e-5)
        rows = (checked[0] != blind[0]).any(1)
        assert rows.any()  # some rows fell back to their plain min/max


def calib_ids(n=8, t=32, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_awq_block_error_not_above_rtn(arch):
    model = FACTORIES[arch]()
    recipe = awq_quantize(model, calib_ids(), QuantConfig(3, 16), AWQConfig(gram_tokens=256))
    assert len(recipe.report) == 2
    for r in recipe.report:
        assert r["awq_error"] <= r["rtn_error"] * (1 + 1e-6)
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("search", ["fast", "exact"])
@pytest.mark.parametrize("arch", ["llama-mha", "gemma3", "opt", "llama-gqa-fold"])
def test_saved_search_reapplies_bit_for_bit(tmp_path, search, arch):
    q = QuantConfig(4, 16)
    gqa = arch == "llama-gqa-fold"
    a = AWQConfig(search=search, gram_tokens=128, duo_scaling=search == "exact", gqa_fold=gqa)
    make = (lambda: llama(gqa=False)) if arch == "llama-mha" else FACTORIES[arch.split("-")[0]]
    model = make()
    recipe = awq_quantize(model, calib_ids(), q, a)
    assert recipe.scales and recipe.clips
    if gqa:  # one scale per v_proj output channel, repeated per query head on o_proj
        v = model.model.layers[0].self_attn.v_proj
        assert recipe.scales["0.attn_out"].shape == (v.out_features,)
        assert v.out_features < model.model.layers[0].self_attn.o_proj.in_features
    path = tmp_path / "search.safetensors"
    recipe.save(path)
    fresh = make()
    loaded = Recipe.load(path)
    assert loaded.searched_on == recipe.searched_on
    assert recipe.searched_on["device"].endswith("threads") and recipe.searched_on["seconds"] >= 0
    apply_recipe(fresh, loaded)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_recipe_saved_before_single_all_tokens_was_recorded_loads_as_it_ran(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "search.safetensors"
    awq_quantize(llama(), calib_ids(), QuantConfig(3, 16), AWQConfig(gram_tokens=128)).save(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["edgequant"])
    assert meta["awq"].pop("single_all_tokens") is True  # the W3 default records it
    save_file(load_file(path), path, metadata={"edgequant": json.dumps(meta)})
    # older code scored down_proj on the Gram sample: that is what such a recipe ran
    assert Recipe.load(path).awq.single_all_tokens is False


def test_non_finite_search_falls_back_to_identity(monkeypatch):
    import edgequant.awq as awq_mod

    monkeypatch.setattr(awq_mod, "scaled_error", lambda *a, **k: float("nan"))
    model = llama()
    recipe = awq_quantize(model, calib_ids(), QuantConfig(4, 16), AWQConfig(gram_tokens=128))
    assert not recipe.scales
    assert len(recipe.fallbacks) == 2 * 3  # 2 blocks x 3 foldable groups (GQA skips attn_out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rtn_is_the_empty_recipe():
    model = llama()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    apply_recipe(model, Recipe(quant=QuantConfig(4, 16)))
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight, fake_quantize(w, QuantConfig(4, 16))[0]
    )


def test_clip_all_adds_q_and_k_to_the_clip_search():
    q = QuantConfig(3, 16)
    names = {}
    for clip_all in (False, True):
        a = AWQConfig(gram_tokens=128, clip_all=clip_all)
        recipe = awq_quantize(llama(), calib_ids(), q, a)
        names[clip_all] = {k.split(".", 1)[1] for k in recipe.clips}
    qk = {"self_attn.q_proj", "self_attn.k_proj"}
    assert not names[False] & qk
    assert names[True] & qk and names[False] <= names[True]


def test_with_every_approximation_off_the_fast_search_is_the_exact_search():
    # module loss on every sample, float32 forwards, and single-linear groups (down_proj)
    # scored on every token: the exact search's scales and clips, even where the Gram sample
    # (8 tokens here) alone picks other down_proj scales
    q = QuantConfig(3, 16)
    exact = awq_quantize(llama(), calib_ids(), q, AWQConfig(search="exact", gram_tokens=8))
    kw = dict(loss_samples=8, bf16_matmul=False, gram_tokens=8)
    full = awq_quantize(llama(), calib_ids(), q, AWQConfig(**kw, single_all_tokens=True))
    assert exact.scales.keys() == full.scales.keys() and exact.clips.keys() == full.clips.keys()
    for k in exact.scales:
        assert torch.equal(exact.scales[k], full.scales[k]), k
    for k in exact.clips:
        assert all(torch.equal(a, b) for a, b in zip(exact.clips[k], full.clips[k], strict=True)), k
    sampled = awq_quantize(llama(), calib_ids(), q, AWQConfig(**kw, single_all_tokens=False))
    downs = [k for k in exact.scales if k.endswith(("mlp_out", "attn_out"))]
    assert downs and any(not torch.equal(exact.scales[k], sampled.scales[k]) for k in downs)


def test_bf16_module_loss_scores_what_bf16_linears_would_and_restores_the_weights():
    # the fast module loss holds every linear of the module in bfloat16 while it scores one
    # candidate: the same numbers as converting float32 weights on each bf16_linears call
    model = llama()
    mlp, q = model.model.layers[0].mlp, QuantConfig(3, 16)
    x = torch.randn(2, 8, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    s = torch.rand(x.shape[-1], generator=torch.Generator().manual_seed(1)) + 0.5
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    lins = [mlp.gate_proj, mlp.up_proj]
    search = AWQSearch(model, q, AWQConfig(loss_samples=2))
    with torch.no_grad(), bf16_linears(mlp):
        got = search._exact_loss(lins, mlp, lambda: mlp(x))(s)
        for n, p in mlp.named_parameters():
            assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
        ref = mlp(x)
        for lin in lins:
            lin.weight.data = fake_quantize(lin.weight * s, q)[0] / s
        want = (mlp(x) - ref).pow(2).mean().item()
    assert got == want


def test_chunk_subset_spreads_over_the_calibration_set():
    assert chunk_subset(32, 4, 0) == list(range(32))
    assert chunk_subset(32, 4, 16) == [0, 8, 16, 24]
    assert chunk_subset(3, 4, 100) == [0, 1, 2]


class TwoPaths(torch.nn.Module):
    """O = out(a(x)) + 0.1 b(x): a's rows reach O through out's columns, b's are damped."""

    def __init__(self, c=32, h=16):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = torch.nn.Linear(c, h), torch.nn.Linear(c, c)
        self.out = torch.nn.Linear(h, c, bias=False)
        self.out.weight.data = torch.randn(c, h, generator=gen) * torch.linspace(0.1, 2.0, h)

    def forward(self, x):
        return self.out(self.a(x)) + 0.1 * self.b(x)


def test_row_sensitivity_is_the_diagonal_of_jtj():
    # a linear path has constant Jacobian: row j of a weighs ||out[:, j]||^2, each row of b
    # 0.1^2; the probe estimate over 16k tokens is within a few percent of that
    m = TwoPaths()
    x = torch.randn(4, 4096, 32, generator=torch.Generator().manual_seed(1))
    saved = [((chunk,), {}) for chunk in x]
    rows = row_sensitivity(m, [m.a, m.b], saved, torch.Generator().manual_seed(0))
    want = torch.cat([m.out.weight.pow(2).sum(0), torch.full((32,), 0.01)]).detach()
    want = want / want.mean()
    assert rows.shape == (48,)
    assert torch.allclose(rows, want, rtol=0.05, atol=1e-3)
    # the hooks are gone and no gradient is left on the weights
    assert not m.a._forward_hooks and m.a.weight.grad is None


def test_sensitivity_weighting_moves_the_multi_linear_choice():
    # block 0's first group (q/k/v, inspected through attention) is searched on the same
    # input either way, so any difference comes from the row weights
    q = QuantConfig(3, 16)
    kw = dict(gram_tokens=128, clip=False)
    on = awq_quantize(llama(), calib_ids(), q, AWQConfig(**kw, sensitivity_samples=8))
    off = awq_quantize(llama(), calib_ids(), q, AWQConfig(**kw, loss_samples=0))
    assert not torch.equal(on.scales["0.attn_in"], off.scales["0.attn_in"])


def test_defaults_follow_the_width_and_the_device():
    assert AWQConfig().resolved(3, True).loss_samples == W3_LOSS_SAMPLES
    assert AWQConfig().resolved(3, True).single_all_tokens is True
    for bits in (2, 4, 8):
        assert AWQConfig().resolved(bits, True).loss_samples == 0
        assert AWQConfig().resolved(bits, True).single_all_tokens is False
    assert AWQConfig(single_all_tokens=False).resolved(3, True).single_all_tokens is False
    assert AWQConfig(single_all_tokens=True).resolved(4, True).single_all_tokens is True
    assert AWQConfig(search="exact").resolved(3, True).single_all_tokens is False
    # an explicit value is kept; the exact search and the sensitivity weights take none
    assert AWQConfig(loss_samples=0).resolved(3, True).loss_samples == 0
    assert AWQConfig(loss_samples=2).resolved(4, True).loss_samples == 2
    assert AWQConfig(search="exact").resolved(3, True).loss_samples == 0
    assert AWQConfig(sensitivity_samples=8).resolved(3, True).loss_samples == 0
    assert AWQConfig(sensitivity_samples=8).resolved(3, True).single_all_tokens is False
    # bf16 matmuls where the device does them fast, unless set
    assert AWQConfig().resolved(4, True).bf16_matmul is True
    assert AWQConfig().resolved(4, False).bf16_matmul is False
    assert AWQConfig(bf16_matmul=True).resolved(4, False).bf16_matmul is True
    assert GPTQConfig().resolved(False) == GPTQConfig(bf16_matmul=False, bf16_hessian=False)
    assert GPTQConfig(bf16_hessian=True).resolved(False).bf16_hessian is True
    # the exact search never runs bf16 and records so
    assert AWQConfig(search="exact").resolved(3, True).bf16_matmul is False


@pytest.mark.parametrize("avx512_bf16, amx, want", [(False, False, False), (True, False, True),
                                                    (False, True, True)])  # fmt: skip
def test_bf16_is_fast_on_cpus_with_native_bf16_only(monkeypatch, avx512_bf16, amx, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_is_fast(torch.device("cpu")) is want


@pytest.mark.parametrize("capability, want", [((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_is_fast_on_cuda_from_ampere(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert bf16_is_fast(torch.device("cuda")) is want
    assert bf16_is_fast(torch.device("meta")) is False


def test_gptq_resolves_bf16_by_the_device(monkeypatch):
    # GPTQConfig() left to the device: where bf16 is slow it is the float32 search exactly
    import edgequant.gptq as gptq

    def run(cfg: GPTQConfig, fast: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(gptq, "bf16_is_fast", lambda device: fast)
        model = llama()
        gptq.gptq_quantize(model, calib_ids(), QuantConfig(3, 16), cfg)
        return list(model.state_dict().values())

    fp32 = run(GPTQConfig(bf16_matmul=False, bf16_hessian=False), True)
    assert all(map(torch.equal, run(GPTQConfig(), False), fp32))
    assert not all(map(torch.equal, run(GPTQConfig(), True), fp32))
    assert GPTQConfig().resolved(True) == GPTQConfig(bf16_matmul=True, bf16_hessian=True)


def test_default_search_records_what_ran_and_matches_the_explicit_setting():
    kw = dict(gram_tokens=128, clip=False)
    bf16 = bf16_is_fast(torch.device("cpu"))
    for bits, want in ((3, W3_LOSS_SAMPLES), (4, 0)):
        q = QuantConfig(bits, 16)
        default = awq_quantize(llama(), calib_ids(), q, AWQConfig(**kw))
        every = bits == 3
        explicit = AWQConfig(**kw, loss_samples=want, single_all_tokens=every, bf16_matmul=bf16)
        explicit = awq_quantize(llama(), calib_ids(), q, explicit)
        assert default.awq.loss_samples == want and default.awq.bf16_matmul is bf16
        assert default.awq.single_all_tokens is every
        assert default.scales.keys() == explicit.scales.keys()
        for k in default.scales:
            assert torch.equal(default.scales[k], explicit.scales[k]), (bits, k)


def test_sensitivity_weights_and_module_loss_do_not_combine():
    with pytest.raises(EdgequantError, match="set one of them to 0"):
        AWQConfig(loss_samples=4, sensitivity_samples=8)


def test_sample_counts_are_fast_search_options():
    with pytest.raises(EdgequantError, match="the exact search scores every sample"):
        AWQConfig(search="exact", loss_samples=4)
    with pytest.raises(EdgequantError, match="must be >= 0"):
        AWQConfig(sensitivity_samples=-1)
