import pytest
import torch
from conftest import FACTORIES

from edgequant.arch import arch_for
from edgequant.config import QuantConfig, StaticConfig
from edgequant.errors import EdgequantError
from edgequant.primitives import fake_quant_static
from edgequant.recipe import Recipe, apply_recipe
from edgequant.smoothquant import smooth_scale, smoothquant, static_error
from edgequant.static import (
    Quantizers,
    bin_centres,
    float_histogram,
    histograms,
    least_error_range,
    least_error_ranges,
    observe_ranges,
    quantize_weights,
    range_setting,
    static_weight,
)


def ids(n=4, t=24, seed=0):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x, use_cache=False).logits


def test_fake_quant_static_grid():
    x = torch.linspace(-3, 5, 1001)
    lo, hi = torch.tensor(-2.0), torch.tensor(4.0)
    y = fake_quant_static(x, lo, hi, 8)
    step = 6.0 / 255
    inside = (x >= -2) & (x <= 4)
    assert (y[inside] - x[inside]).abs().max() <= step / 2 + 1e-6
    assert y.min() >= -2 - 1e-6 and y.max() <= 4 + 1e-6  # clamped to the range
    assert torch.unique(y).numel() <= 256
    # zero is exactly representable, also when the range does not hold it
    assert fake_quant_static(torch.zeros(3), torch.tensor(1.0), torch.tensor(2.0), 8).eq(0).all()


def test_fake_quant_static_gradients_reach_the_range():
    x = torch.randn(100) * 3
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor(1.0, requires_grad=True)
    fake_quant_static(x, lo, hi, 8).pow(2).sum().backward()
    assert lo.grad.abs() > 0 and hi.grad.abs() > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_passthrough_attention_and_removal_leave_logits(arch):
    model = FACTORIES[arch]()
    x = ids()
    ref = logits(model, x)
    qs = Quantizers(model, StaticConfig())
    with qs.mode("off"):
        assert torch.allclose(logits(model, x), ref, atol=1e-5)
    qs.remove()
    assert torch.equal(logits(model, x), ref)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_ranges_a16_close_a8_coarser(arch):
    model = FACTORIES[arch]()
    x = ids(seed=1)
    cal = torch.cat([x, ids(n=8, seed=2)])  # ranges cover x: only rounding remains
    ref = logits(model, x)
    errs = {}
    for a_bits in (16, 8):
        qs = Quantizers(model, StaticConfig(a_bits=a_bits))
        observe_ranges(model, qs, cal)
        table = qs.table()
        assert len(table) == len(arch_for(model).act_points) * model.config.num_hidden_layers
        assert all(r["lo"] <= r["hi"] for r in table.values())
        errs[a_bits] = (logits(model, x) - ref).pow(2).mean().item()
        qs.remove()
    assert errs[16] < 1e-3 * ref.pow(2).mean().item()
    assert errs[16] < errs[8]


def point_inputs(model, qs, x) -> dict[str, torch.Tensor]:
    """What flows into each quantizer on ids x (quantizers off)."""
    seen, hooks = {}, []
    for k, q in qs.quant.items():
        hook = lambda m, a, out, k=k: seen.setdefault(k, []).append(a[0].detach())  # noqa: E731
        hooks.append(q.register_forward_hook(hook))
    with qs.mode("off"):
        logits(model, x)
    for h in hooks:
        h.remove()
    return {k: torch.cat([t.flatten() for t in v]) for k, v in seen.items()}


def test_mse_ranges_stay_within_min_max_and_do_not_raise_the_error():
    model = FACTORIES["llama"]()
    cal = ids(n=8, seed=3)
    tables, errors = {}, {}
    for ranges in ("minmax", "mse"):
        qs = Quantizers(model, StaticConfig())
        observe_ranges(model, qs, cal, ranges=ranges)
        tables[ranges] = qs.table()
        xs = point_inputs(model, qs, cal)
        eight = [(k, q) for k, q in qs.quant.items() if q.bits == 8]
        errors[ranges] = sum(
            (fake_quant_static(xs[k], q.lo, q.hi, 8) - xs[k]).pow(2).sum().item() for k, q in eight
        )
        qs.remove()
    narrower = 0
    for name, mm in tables["minmax"].items():
        mse = tables["mse"][name]
        if mm["bits"] == 16:
            assert mse == mm, name  # 16-bit points keep min / max
            continue
        assert mm["lo"] <= mse["lo"] <= 0 <= mse["hi"] <= mm["hi"], name
        narrower += mse["hi"] - mse["lo"] < mm["hi"] - mm["lo"]
    assert narrower > 0
    assert errors["mse"] <= errors["minmax"] * 1.001


def student_t(n: int, df: int = 2) -> torch.Tensor:
    # -> [n] Student-t samples: a long tail, as activations have
    z = torch.randn(n, df + 1, generator=torch.Generator().manual_seed(0))
    return z[:, 0] / z[:, 1:].pow(2).mean(1).sqrt()


def quant_error(x, lo, hi, bits=8) -> float:
    return (fake_quant_static(x.clone(), lo, hi, bits) - x).pow(2).mean().item()


def test_least_error_range_beats_min_max_and_every_range_of_its_grid():
    x = student_t(100_000)
    x = torch.where(x > 0, x * 3, x)  # asymmetric tails
    lo, hi = least_error_range(float_histogram(x))
    assert x.min() < lo < 0 < hi < x.max()
    best = quant_error(x, lo, hi)
    assert best < 0.9 * quant_error(x, x.min(), x.max())
    c = torch.arange(100, 0, -1) / 100  # the search's grid: every (lo, hi) pair
    others = [quant_error(x, x.min() * a, x.max() * b) for a in c[::3] for b in c[::3]]
    assert best <= min(others) * 1.01


def test_least_error_range_keeps_a_tail_that_a_peak_at_zero_cannot_pay_for():
    # values within half a step of 0 round to 0 exactly: narrowing the range gains them nothing
    peak = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    x = torch.cat([peak, torch.ones(5)])
    lo, hi = least_error_range(float_histogram(x))
    assert lo == 0 and hi == pytest.approx(1.0, rel=0.02)


def test_float_histogram_counts_every_value_in_its_bin():
    x = torch.tensor([0.0, -0.0, 1.0, 1.01, -3.0, 2.0**30, 1e-40])
    counts = float_histogram(x)
    assert counts.dtype == torch.int64 and counts.sum() == len(x)
    centres = bin_centres()
    for value in (1.0, 1.01, -3.0, 2.0**30):
        side = int(value > 0)
        k = counts[side].nonzero().flatten()
        assert any(abs(centres[i] / abs(value) - 1) < 0.016 for i in k), value
    assert float_histogram(torch.full((20_000_000,), 0.5)).sum() == 20_000_000  # past 2^24
    assert least_error_range(float_histogram(x.abs()))[0] == 0
    assert least_error_range(float_histogram(torch.zeros(5))) == (0, 0)
    lo, hi = least_error_range(float_histogram(torch.full((9,), 2.0)))
    assert lo == 0 and hi == pytest.approx(2.0, rel=0.02)


def test_a_long_tailed_point_gets_its_least_error_range():
    model = FACTORIES["llama"]()
    qs = Quantizers(model, StaticConfig())
    seen, hooks = histograms(qs)
    name = "0/mlp_down_proj:in"
    q = qs.quant[name]
    x = student_t(100_000)
    q(x)  # observing: min / max and the histogram
    minmax = (q.lo.item(), q.hi.item())
    least_error_ranges(qs, {name: seen[name]})
    for h in hooks:
        h.remove()
    assert minmax[0] < q.lo.item() < 0 < q.hi.item() < minmax[1]
    q.mode = "quant"
    err = (q(x) - x).pow(2).mean().item()
    assert err < 0.9 * quant_error(x, *(torch.tensor(v) for v in minmax))


def test_range_settings_by_method_and_bad_names():
    assert range_setting(StaticConfig(), "static-rtn") == "minmax"
    assert range_setting(StaticConfig(), "smoothquant") == "mse"
    assert range_setting(StaticConfig(), "mobilequant") == "mse"
    assert range_setting(StaticConfig(ranges="minmax"), "smoothquant") == "minmax"
    with pytest.raises(EdgequantError, match="ranges must be one of"):
        StaticConfig(ranges="percentile")
    model = FACTORIES["llama"]()
    with pytest.raises(EdgequantError, match="activation ranges must be one of"):
        observe_ranges(model, Quantizers(model, StaticConfig()), ids(), ranges="max")


def test_unobserved_or_nan_range_is_a_clear_error():
    model = FACTORIES["llama"]()
    qs = Quantizers(model, StaticConfig())
    with pytest.raises(EdgequantError, match="never observed"):
        qs.freeze()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(EdgequantError, match="NaN"):
        observe_ranges(model, qs, ids())


def test_unsupported_architecture_has_no_precision_map():
    with pytest.raises(EdgequantError, match="precision map"):
        Quantizers(FACTORIES["opt"](), StaticConfig())


@pytest.mark.parametrize("w_bits,sym", [(8, False), (4, False), (4, True)])
def test_static_weight_grids(w_bits, sym):
    model = FACTORIES["llama"]()
    cfg = StaticConfig(w_bits=w_bits, w_symmetric=sym)
    before = {n: p.clone() for n, p in model.named_parameters()}
    quantize_weights(model, cfg)
    for n, p in model.named_parameters():
        if "proj" not in n:
            assert torch.equal(p, before[n])
            continue
        per_row = w_bits == 4 or "down_proj" in n
        levels = [torch.unique(r).numel() for r in p] if per_row else [torch.unique(p).numel()]
        assert max(levels) <= 2**w_bits
    w = torch.randn(16, 32)
    q = static_weight(w, QuantConfig(8, -1), per_channel=False)
    assert torch.unique(q).numel() <= 256 and (q - w).abs().max() < (w.max() - w.min()) / 255


def outlier_inputs(n=512, c=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen)
    x[:, :3] *= 50.0  # outlier channels, as in LLM activations
    return x, torch.randn(48, c, generator=gen) * 0.05


def test_smoothing_lowers_static_w8a8_error():
    x, w = outlier_inputs()
    grid = [(QuantConfig(8, -1), False)]
    plain = static_error(x, [w], grid, torch.ones(64), 8)
    s = smooth_scale(x.abs().amax(0), w.abs().amax(0), 0.5)
    assert static_error(x, [w], grid, s, 8) < 0.5 * plain
    # the float product is unchanged by the scale
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, atol=1e-3)


def test_the_alpha_search_scores_the_range_setting_it_will_get(monkeypatch):
    import edgequant.smoothquant as sq

    seen = []
    scored = sq.static_error
    monkeypatch.setattr(sq, "static_error", lambda *a: seen.append(a[-1]) or scored(*a))
    for ranges in ("mse", "minmax", None):
        seen.clear()
        cfg = StaticConfig(alpha=None, alpha_grid=2, search_tokens=64, ranges=ranges)
        smoothquant(FACTORIES["llama"](), ids(n=2), cfg)
        assert seen and set(seen) == {ranges or "mse"}
    monkeypatch.undo()
    _, w = outlier_inputs()
    x = student_t(512 * 64).view(512, 64)  # a long tail stretches the min/max step for the bulk
    grid = [(QuantConfig(8, -1), False)]
    ones = torch.ones(64)
    minmax = static_error(x, [w], grid, ones, 8)
    mse = static_error(x, [w], grid, ones, 8, ranges="mse")
    assert mse < minmax  # the weights' own rounding error is in both
    # 16-bit inputs keep min / max
    a16 = static_error(x, [w], grid, ones, 16)
    assert static_error(x, [w], grid, ones, 16, ranges="mse") == a16


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("alpha", [0.5, None])
def test_smoothquant_folding_keeps_float_outputs(arch, alpha, tmp_path):
    model = FACTORIES[arch]()
    x = ids(seed=3)
    ref = logits(model, x)
    recipe = smoothquant(model, ids(n=8, seed=4), StaticConfig(alpha=alpha, search_tokens=128))
    if alpha is not None:
        assert len(recipe.scales) >= 3 * model.config.num_hidden_layers
    assert (logits(model, x) - ref).abs().max() < 1e-4
    path = tmp_path / "sq.safetensors"
    recipe.save(path)
    fresh = FACTORIES[arch]()
    apply_recipe(fresh, Recipe.load(path), quantize=False)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("method", ["static-rtn", "smoothquant", "mobilequant"])
def test_quantize_static_api(method, tokenizer, calib_file):
    from edgequant.api import quantize_static
    from edgequant.config import CalibConfig, MobileQuantConfig

    model = FACTORIES["llama"]()
    x = ids(seed=5)
    ref = logits(model, x)
    calib = CalibConfig(source=str(calib_file), n_samples=8, seqlen=32)
    qs, recipe = quantize_static(
        model, tokenizer, method, StaticConfig(), calib, MobileQuantConfig(epochs=1)
    )
    assert (recipe is None) == (method == "static-rtn")
    assert qs.cfg.ranges == ("minmax" if method == "static-rtn" else "mse")  # resolved
    out = logits(model, x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert all(q.mode == "quant" for q in qs.quant.values())
    qs.remove()
    assert not torch.equal(logits(model, x), ref)  # the weights stay on their grids


@pytest.mark.parametrize("adds_bos", [True, False])
@pytest.mark.parametrize("calib_bos", [True, False])
def test_calibration_starts_with_bos_where_asked_and_the_tokenizer_adds_it(
    adds_bos, calib_bos, tokenizer, calib_file, monkeypatch
):
    from conftest import bos_tokenizer

    import edgequant.static as static
    from edgequant.api import quantize_static
    from edgequant.config import CalibConfig

    tok = bos_tokenizer() if adds_bos else tokenizer
    seen = []
    observe = static.observe_ranges
    monkeypatch.setattr(
        static, "observe_ranges", lambda m, q, x, **kw: seen.append(x) or observe(m, q, x, **kw)
    )
    calib = CalibConfig(source=str(calib_file), n_samples=4, seqlen=32)
    cfg = StaticConfig(calib_bos=calib_bos)
    qs, _ = quantize_static(FACTORIES["llama"](), tok, "static-rtn", cfg, calib)
    first = seen[0][:, 0]
    assert qs.cfg.calib_bos is (adds_bos and calib_bos)  # what the windows were, recorded
    assert bool((first == tok.bos_token_id).all()) is (adds_bos and calib_bos)


def test_quantize_static_unknown_method(tokenizer):
    from edgequant.api import quantize_static

    with pytest.raises(EdgequantError, match="unknown method"):
        quantize_static(FACTORIES["llama"](), tokenizer, "gptq")
