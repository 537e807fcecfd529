"""benchmarks/w8a8.py's MobileQuant knobs: parsed into the config, named in the row label."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from edgequant.config import MobileQuantConfig

bench = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(bench))  # w8a8.py imports provenance.py beside it
spec = importlib.util.spec_from_file_location("w8a8", bench / "w8a8.py")
w8a8 = importlib.util.module_from_spec(spec)
sys.modules["w8a8"] = w8a8
spec.loader.exec_module(w8a8)


def test_knobs_set_the_config_and_name_the_row():
    mcfg = w8a8.mobilequant_knobs("lr_clip=0.01,epochs=6,windows=0")
    assert (mcfg.lr_clip, mcfg.epochs, mcfg.windows) == (0.01, 6, 0)
    assert mcfg.lr_scale == MobileQuantConfig().lr_scale
    assert w8a8.mobilequant_label(mcfg) == "mobilequant epochs=6 lr_clip=0.01 windows=all"
    assert w8a8.mobilequant_label(w8a8.mobilequant_knobs("")) == "mobilequant"
    per_tensor = w8a8.mobilequant_knobs("clip_per_channel=False")
    assert per_tensor.clip_per_channel is False
    assert w8a8.mobilequant_knobs("clip_per_channel=true").clip_per_channel is True
    hidden = w8a8.mobilequant_knobs("loss=hidden,clip_search=off")
    assert w8a8.mobilequant_label(hidden) == "mobilequant clip_search=off loss=hidden"


@pytest.mark.parametrize(
    "text, says",
    [
        ("lr=0.1", "want NAME=VALUE"),
        ("epochs", "want NAME=VALUE"),
        ("epochs=2,epochs=4", "once per NAME"),
        ("epochs=x", "not of type int"),
        ("clip_per_channel=1", "not of type bool"),
        ("epochs=0", "must be positive"),
        ("loss=kl", "loss must be one of"),
    ],
)
def test_a_bad_knob_is_refused_with_a_reason(text, says):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        w8a8.mobilequant_knobs(text)


def test_a_run_trained_here_records_its_loss_per_step(tokenizer, calib_file):
    from conftest import FACTORIES

    from edgequant.config import CalibConfig, StaticConfig

    calib = CalibConfig(source=str(calib_file), n_samples=8, seqlen=32)
    mcfg = MobileQuantConfig(epochs=2, batch=4, windows=4)
    model = FACTORIES["llama"]()
    label, seconds, extra = w8a8.mobilequant_row(
        model, tokenizer, StaticConfig(), calib, None, mcfg
    )
    assert label == "mobilequant batch=4 epochs=2 windows=4" and seconds > 0
    losses, held = extra["losses"], extra["calib_heldout"]
    assert len(losses) == 2 and all(x > 0 for x in losses)  # 4 windows per step, 2 epochs
    assert held["windows"] == 4 and held["start"] > 0  # the 4 calibration windows left out
    row = {"model": "m", "config": "w8a8", "method": label, "losses": losses}
    row["calib_heldout"] = held
    (line,) = [x for x in w8a8.training_losses({"k": row}) if x.startswith("- m w8a8")]
    assert f"first step {losses[0]:.4g}" in line and "(2 steps)" in line
    assert f"not trained on {held['start']:.4g} before, {held['end']:.4g} after" in line


def test_rows_name_static_knobs_off_their_defaults_and_pair_with_their_smoothquant(
    monkeypatch, tokenizer
):
    from conftest import bos_tokenizer

    from edgequant.config import StaticConfig

    default = w8a8.static_knobs("smoothquant", StaticConfig(), tokenizer)
    assert default == {"alpha": 0.5, "ranges": "mse"}  # no BOS added: calib_bos is moot
    assert w8a8.static_label("smoothquant", default) == ""
    old = w8a8.static_knobs("mobilequant", StaticConfig(alpha=None, ranges="minmax"), tokenizer)
    assert w8a8.static_label("mobilequant", old) == " alpha=search ranges=minmax"
    rtn = w8a8.static_knobs("static-rtn", StaticConfig(), tokenizer)
    assert rtn == {"ranges": "minmax"} and w8a8.static_label("static-rtn", rtn) == ""
    adding = bos_tokenizer()
    assert w8a8.static_knobs("static-rtn", StaticConfig(), adding)["calib_bos"] is True
    no_bos = w8a8.static_knobs("smoothquant", StaticConfig(calib_bos=False), adding)
    assert w8a8.static_label("smoothquant", no_bos) == " calib_bos=False"

    def row(method, knobs, austen):
        ppl = {t: {"ppl": austen} for t in w8a8.TEXTS}
        return {"model": "m", "config": "w8a8", "method": method, "ppl": ppl} | knobs

    rows = {
        "fp": row("fp", {}, 10.0) | {"config": "fp"},
        "sq": row("smoothquant", default, 12.0),
        "sq-old": row("smoothquant alpha=search ranges=minmax", old, 20.0),
        "mq-old": row("mobilequant alpha=search ranges=minmax", old, 15.0),
    }
    assert w8a8.same_smoothing(rows, rows["mq-old"]) is rows["sq-old"]
    rows = {f"m|{r['config']}|{r['method']}": r for r in rows.values()}
    monkeypatch.setattr(w8a8, "MODELS", ("m",))
    (line,) = [t for t, ok in w8a8.checks(rows) if t.startswith("m w8a8 austen")]
    assert "(15.000 vs 20.000)" in line  # against the SmoothQuant it started from, not 12


def test_only_the_best_mobilequant_row_decides_and_the_others_say_whether_they_hold(
    monkeypatch,
):
    knobs = {"alpha": 0.5, "ranges": "mse"}

    def row(method, austen, config="w8a8"):
        ppl = {t: {"ppl": austen} for t in w8a8.TEXTS}
        return {"model": "m", "config": config, "method": method, "ppl": ppl} | knobs

    rows = [row("fp", 10.0, "fp"), row("smoothquant", 12.0), row("mobilequant", 10.5)]
    rows.append(row("mobilequant epochs=1", 13.0))
    monkeypatch.setattr(w8a8, "MODELS", ("m",))
    got = w8a8.checks({w8a8.key(r): r for r in rows})
    best = [(t, ok) for t, ok in got if t.startswith("m w8a8 austen: mobilequant <")]
    assert best == [("m w8a8 austen: mobilequant < SmoothQuant (10.500 vs 12.000)", True)]
    info = [(t, ok) for t, ok in got if "epochs=1" in t and t.startswith("m w8a8 austen")]
    assert info == [
        (
            "m w8a8 austen: mobilequant epochs=1 < SmoothQuant (13.000 vs 12.000): does not hold",
            "info",
        )
    ]
    info = [(t, ok) for t, ok in got if "epochs=1 within" in t and "austen" in t]
    assert info == [("m W8A8 austen: mobilequant epochs=1 within 10% of FP (+30.0%): "
                     "does not hold", "info")]  # fmt: skip
