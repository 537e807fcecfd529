from dataclasses import replace

import pytest
import torch
from conftest import FACTORIES

from edgequant.arch import arch_for
from edgequant.config import MobileQuantConfig, StaticConfig
from edgequant.errors import EdgequantError
from edgequant.mobilequant import apply_trained, train
from edgequant.objective import objective
from edgequant.smoothquant import smoothquant

SCFG = StaticConfig(w_bits=4, search_tokens=128)
MCFG = MobileQuantConfig(
    epochs=6, batch=4, lr_scale=1e-2, lr_clip=1e-1, lr_range=1e-2, save_every=2
)


def calib(n=8, t=32):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(0))


def smoothed(arch):
    model = FACTORIES[arch]()
    smoothquant(model, calib(), SCFG)
    return model


@pytest.mark.parametrize(
    ("arch", "loss"), [("llama", "fisher"), ("gemma3", "fisher"), ("llama", "hidden")]
)
def test_training_lowers_the_loss_and_bakes_quantized_weights(arch, loss):
    ref, cfg = smoothed(arch), replace(MCFG, loss=loss)
    obj = objective(ref, arch_for(ref), loss, calib())  # the one training builds
    targets = obj.targets(ref, calib(), 4)
    start, trained = smoothed(arch), smoothed(arch)
    train(start, calib(), SCFG, cfg, max_steps=0)
    qs, losses = train(trained, calib(), SCFG, cfg)
    assert len(losses) == cfg.epochs * 2
    assert obj.mean(trained, calib(), targets, 4) < 0.9 * obj.mean(start, calib(), targets, 4)
    # baked: no parametrization left, every block linear on a 4-bit grid per row
    lin = trained.model.layers[0].mlp.down_proj
    assert not hasattr(lin, "parametrizations")
    assert max(torch.unique(r).numel() for r in lin.weight) <= 16
    assert all(r["lo"] <= 0 <= r["hi"] for r in qs.table().values())


def test_resumed_run_continues_from_the_saved_step(tmp_path):
    path = tmp_path / "mq.pt"
    whole, _ = train(smoothed("llama"), calib(), SCFG, MCFG)
    first = smoothed("llama")
    train(first, calib(), SCFG, MCFG, state_path=path, max_steps=5)
    assert torch.load(path, weights_only=True)["step"] == 5
    model = smoothed("llama")
    resumed, losses = train(model, calib(), SCFG, MCFG, state_path=path)
    assert len(losses) == MCFG.epochs * 2  # the first five losses came from the saved state
    assert torch.load(path, weights_only=True)["step"] == MCFG.epochs * 2
    for (k, a), b in zip(whole.table().items(), resumed.table().values(), strict=True):
        assert a == pytest.approx(b, rel=1e-5), k


def test_resume_refuses_another_configuration(tmp_path):
    path = tmp_path / "mq.pt"
    train(smoothed("llama"), calib(), SCFG, MCFG, state_path=path, max_steps=2)
    other = MobileQuantConfig(epochs=3)
    with pytest.raises(EdgequantError, match="another MobileQuant configuration"):
        train(smoothed("llama"), calib(), SCFG, other, state_path=path)


def test_saved_state_reapplies_to_the_same_weights_and_ranges(tmp_path):
    path = tmp_path / "mq.pt"
    trained = smoothed("llama")
    qs, _ = train(trained, calib(), SCFG, MCFG, state_path=path)
    fresh = smoothed("llama")
    again = apply_trained(fresh, SCFG, MCFG, path)
    assert again.table() == qs.table()
    for (n, a), b in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    x = calib(2, 16)
    with torch.no_grad():
        assert torch.equal(trained(x).logits, fresh(x).logits)


def test_failed_training_leaves_the_model_as_it_came(monkeypatch):
    import edgequant.objective as objective_module

    model = smoothed("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(objective_module.F, "mse_loss", lambda a, b: torch.tensor(float("nan")))
    with pytest.raises(EdgequantError, match="loss became nan"):
        train(model, calib(), SCFG, MCFG)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation != "edgequant_static"


def test_windows_trains_on_an_evenly_spaced_subset():
    from edgequant.mobilequant import training_windows

    ids = calib()
    assert torch.equal(training_windows(ids, 4), ids[[0, 2, 4, 6]])
    assert training_windows(ids, 0) is ids and training_windows(ids, 99) is ids
    _, losses = train(smoothed("llama"), ids, SCFG, replace(MCFG, windows=4))
    assert len(losses) == MCFG.epochs  # one step of 4 windows per epoch
    with pytest.raises(EdgequantError, match="windows must be >= 0"):
        MobileQuantConfig(windows=-1)


@pytest.mark.parametrize(("n", "windows"), [(8, 4), (10, 3), (128, 32), (9, 8)])
def test_windows_left_out_of_training_are_not_trained_on(n, windows):
    from edgequant.mobilequant import heldout_windows, training_windows

    ids = torch.arange(n)[:, None].expand(n, 2)
    train_rows = set(training_windows(ids, windows)[:, 0].tolist())
    held_rows = heldout_windows(ids, windows)[:, 0].tolist()
    assert len(train_rows) == windows and len(held_rows) == min(8, n - windows)
    assert len(set(held_rows)) == len(held_rows) and not train_rows & set(held_rows)


def test_windows_left_out_of_training_check_it(tmp_path, capsys):
    from edgequant.mobilequant import heldout_windows

    ids = calib()
    assert torch.equal(heldout_windows(ids, 4), ids[[1, 3, 5, 7]])
    assert torch.equal(heldout_windows(ids, 4, count=2), ids[[1, 5]])
    assert len(heldout_windows(ids, 0)) == 0 and len(heldout_windows(ids, 8)) == 0
    path = tmp_path / "mq.pt"
    model = smoothed("llama")  # the 16-bit ranges kept: 4 windows train without overfitting
    train(model, ids, SCFG, replace(MCFG, windows=4), state_path=path)
    held = torch.load(path, weights_only=True)["heldout"]
    assert held["windows"] == 4 and held["end"] < held["start"]
    assert held["steps"] == held["total"] == MCFG.epochs
    out = capsys.readouterr().out
    assert f"loss on 4 calibration windows not trained on {held['start']:.4g} -> " in out
    assert "raised it" not in out and "steps" not in out.split("not trained on")[1]


def test_the_check_of_an_early_stop_says_so_and_needs_no_saved_state(tmp_path, capsys):
    path = tmp_path / "new.pt"  # nothing saved yet: max_steps=0 writes no state
    train(smoothed("llama"), calib(), SCFG, replace(MCFG, windows=4), path, max_steps=0)
    assert f"after 0 of {MCFG.epochs} steps" in capsys.readouterr().out
    assert not path.exists()


def test_a_state_saved_before_the_windows_knob_still_loads(tmp_path):
    path, every = tmp_path / "mq.pt", replace(MCFG, windows=0)
    qs, _ = train(smoothed("llama"), calib(), SCFG, every, state_path=path)
    state = torch.load(path, weights_only=True)
    del state["config"]["windows"]  # as written by earlier versions: all windows trained on
    torch.save(state, path)
    assert apply_trained(smoothed("llama"), SCFG, every, path).table() == qs.table()
    with pytest.raises(EdgequantError, match="another MobileQuant configuration"):
        apply_trained(smoothed("llama"), SCFG, replace(MCFG, windows=4), path)


def test_a_state_saved_before_the_learn_a16_knob_loads_as_learning_them(tmp_path):
    path, every = tmp_path / "mq.pt", replace(MCFG, learn_a16=True)
    qs, _ = train(smoothed("llama"), calib(), SCFG, every, state_path=path, max_steps=2)
    state = torch.load(path, weights_only=True)
    del state["config"]["learn_a16"]  # as written by earlier versions: every range trained
    torch.save(state, path)
    assert apply_trained(smoothed("llama"), SCFG, every, path).table() == qs.table()
    with pytest.raises(EdgequantError, match="learn_a16=True \\(now False\\)"):
        apply_trained(smoothed("llama"), SCFG, MCFG, path)


@pytest.mark.parametrize(("knob", "legacy"), [("loss", "hidden"), ("clip_search", "off")])
def test_a_state_saved_before_a_knob_loads_as_what_it_ran(knob, legacy, tmp_path):
    path, old = tmp_path / "mq.pt", replace(MCFG, **{knob: legacy})
    qs, _ = train(smoothed("llama"), calib(), SCFG, old, state_path=path, max_steps=2)
    state = torch.load(path, weights_only=True)
    del state["config"][knob]  # as written before the knob
    torch.save(state, path)
    assert apply_trained(smoothed("llama"), SCFG, old, path).table() == qs.table()
    now = getattr(MCFG, knob)
    with pytest.raises(EdgequantError, match=f"{knob}={legacy} \\(now {now}\\)"):
        apply_trained(smoothed("llama"), SCFG, MCFG, path)


def test_a_state_saved_before_the_ranges_setting_loads_as_minmax(tmp_path):
    path, minmax = tmp_path / "mq.pt", replace(SCFG, ranges="minmax")
    qs, _ = train(smoothed("llama"), calib(), minmax, MCFG, state_path=path)
    state = torch.load(path, weights_only=True)
    assert state["static"]["ranges"] == "minmax"
    del state["static"]["ranges"]  # as written by earlier versions: min / max ranges
    torch.save(state, path)
    assert apply_trained(smoothed("llama"), minmax, MCFG, path).table() == qs.table()
    with pytest.raises(EdgequantError, match="another static configuration"):
        apply_trained(smoothed("llama"), SCFG, MCFG, path)  # SCFG: mobilequant's mse


@pytest.mark.parametrize("learn_a16", [False, True])
def test_learn_a16_decides_whether_16_bit_ranges_train(learn_a16):
    untrained, _ = train(smoothed("llama"), calib(), SCFG, MCFG, max_steps=0)
    cfg = replace(MCFG, learn_a16=learn_a16)
    qs, losses = train(smoothed("llama"), calib(), SCFG, cfg, max_steps=4)
    assert len(losses) == 4
    start, end = untrained.table(), qs.table()
    wide = [k for k, r in end.items() if r["bits"] == 16]
    narrow = [k for k, r in end.items() if r["bits"] == 8]
    assert wide and narrow
    moved = [end[k] != pytest.approx(start[k], rel=1e-3) for k in wide]
    assert any(moved) if learn_a16 else not any(moved)
    assert any(end[k] != pytest.approx(start[k], rel=1e-3) for k in narrow)


@pytest.mark.parametrize("search", ["output", "weight", "off"])
def test_clipping_starts_at_the_least_error_ratio_or_at_clip_init(search):
    from edgequant.mobilequant import attach, bake, input_moments

    model, cfg = smoothed("llama"), replace(MCFG, clip_search=search)
    spec = arch_for(model)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()  # W4: one grid per row
    x2 = input_moments(model, spec, calib(), 4)
    assert x2["0/mlp_up_proj"].shape == (w.shape[1],) and (x2["0/mlp_up_proj"] > 0).all()
    eff = attach(model, spec, SCFG, cfg, search=True, x2=x2).weights["0/mlp_up_proj"]
    assert eff.lo_logit.shape == (w.shape[0], 1)
    if search == "off":
        assert (eff.lo_logit == cfg.clip_init).all() and (eff.hi_logit == cfg.clip_init).all()
    else:
        assert (eff.hi_logit <= cfg.clip_init + 1e-6).all() and (eff.hi_logit < 3.0).any()
        weight = x2["0/mlp_up_proj"] if search == "output" else torch.ones(w.shape[1])
        with torch.no_grad():
            searched = ((eff(w) - w).pow(2) * weight).sum(1)
            eff.lo_logit.fill_(cfg.clip_init), eff.hi_logit.fill_(cfg.clip_init)
            assert (searched <= ((eff(w) - w).pow(2) * weight).sum(1) + 1e-9).all()
    bake(model, keep=False)


def test_per_tensor_clipping_weighs_the_input_and_keeps_clip_init_where_nothing_helps():
    from edgequant.mobilequant import clip_logits, weight_config

    spec = arch_for(FACTORIES["llama"]())
    qcfg, per_channel = weight_config("mlp.up_proj", spec, StaticConfig(w_bits=8))
    assert not per_channel  # W8: one grid for the tensor
    w = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    w[3, 5] = 40.0  # stretches the tensor's grid 40-fold
    x2 = torch.ones(64)
    x2[5] = 0.0  # column 5 never reaches the output: clip the outlier freely
    assert clip_logits(w, qcfg, False, MCFG, x2).shape == (1, 1)
    assert clip_logits(w, qcfg, False, MCFG, x2).item() < 0.0  # ratio below one half
    x2[5] = 1e6  # column 5 carries the output: keep the outlier, start at clip_init exactly
    assert clip_logits(w, qcfg, False, MCFG, x2).item() == MCFG.clip_init
