"""Bad input gives one clear line, a non-zero exit and nothing half-written."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgequant.checkpoint import load_quantized
from edgequant.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def quantize_args(model, out, calib, *extra):
    return [
        "quantize",
        model,
        "--method",
        "awq",
        "--n-samples",
        "4",
        "--seqlen",
        "32",
        "--calib",
        calib,
        "--out",
        out,
        "--group-size",
        "16",
        *extra,
    ]


def assert_clean_failure(code, err, tmp_path, match):
    assert code == 2
    assert len([e for e in err if e.startswith("edgequant: error:")]) == 1, err
    assert match in err[-1], err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))]
    assert leftovers == [], leftovers


def test_group_size_not_dividing(capsys, tmp_path, tiny_dir, calib_file):
    code, err = run(
        capsys, *quantize_args(tiny_dir(), tmp_path / "out", calib_file, "--group-size", "48")
    )
    assert_clean_failure(code, err, tmp_path, "group size 48 does not divide in_features 64")


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(capsys, tmp_path, tiny_dir, calib_file, bits):
    code, err = run(
        capsys, *quantize_args(tiny_dir(), tmp_path / "out", calib_file, "--w-bits", bits)
    )
    assert_clean_failure(code, err, tmp_path, "bits must be an integer in 2..8")


@pytest.mark.parametrize("text", ["", "just a few words here"])
def test_empty_or_short_calibration(capsys, tmp_path, tiny_dir, text):
    calib = tmp_path / "short.txt"
    calib.write_text(text)
    code, err = run(capsys, *quantize_args(tiny_dir(), tmp_path / "out", calib))
    assert_clean_failure(code, err, tmp_path, "is too short: 0 of 4 samples of 32 tokens")


def test_nonexistent_model(capsys, tmp_path, calib_file):
    code, err = run(capsys, *quantize_args(tmp_path / "nope", tmp_path / "out", calib_file))
    assert_clean_failure(code, err, tmp_path, "model not found")


def test_unknown_text_source(capsys, tmp_path, tiny_dir):
    code, err = run(capsys, "eval", tiny_dir(), "--ppl", "no-such-text")
    assert code == 2 and "unknown text source 'no-such-text'" in err[-1]


def test_nan_activations(capsys, tmp_path, tiny_dir, calib_file):
    path = tiny_dir()
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    code, err = run(capsys, *quantize_args(path, tmp_path / "out", calib_file))
    assert_clean_failure(code, err, tmp_path, "non-finite activations")
    assert "block 1" in err[-1]


def test_unknown_architecture(capsys, tmp_path, tiny_dir, calib_file):
    path = tiny_dir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, *quantize_args(path, tmp_path / "out", calib_file))
    assert code == 2 and "supported model types: gemma3_text, llama" in err[-1]


def test_quantize_save_and_eval(capsys, tmp_path, tiny_dir, calib_file):
    out, search, js = tmp_path / "q", tmp_path / "s.safetensors", tmp_path / "e.json"
    code = main(
        [
            str(a)
            for a in quantize_args(
                tiny_dir(), out, calib_file, "--group-size", "16", "--save-search", search
            )
        ]
    )
    assert code == 0 and (out / "config.json").is_file() and search.is_file()
    assert (
        main(
            [
                "eval",
                str(out),
                "--ppl",
                str(calib_file),
                "--max-windows",
                "2",
                "--window",
                "64",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    res = json.loads(js.read_text())
    assert (
        res["windows"] == 2
        and res["ppl"] > 1
        and "non-overlapping windows of 64" in res["protocol"]
    )
    # re-applying the saved search reproduces the saved checkpoint bit for bit
    out2 = tmp_path / "q2"
    argv = ["quantize", tiny_dir(), "--load-search", search, "--out", out2]
    assert main([str(x) for x in argv]) == 0
    a, b = load_quantized(out).state_dict(), load_quantized(out2).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["version"] == "gemm"


def test_compare_prints_table(capsys, tmp_path, tiny_dir, calib_file):
    js = tmp_path / "c.json"
    argv = ["compare", tiny_dir(), "--w-bits", "3", "--group-size", "16", "--calib", calib_file,
            "--n-samples", "4", "--seqlen", "32", "--ppl", calib_file, "--max-windows", "2",
            "--json", js]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "| rtn |" in out and "| awq |" in out and "protocol:" in out
    rows = json.loads(js.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "rtn", "awq"]
    assert all(next(iter(r["ppl"].values()))["windows"] == 2 for r in rows)


def test_eval_compare_to_reports_kl_and_agreement(capsys, tmp_path, tiny_dir, calib_file):
    out, js = tmp_path / "q", tmp_path / "f.json"
    argv = quantize_args(tiny_dir(), out, calib_file, "--group-size", "16")
    assert main([str(a) for a in argv]) == 0
    common = ["--ppl", str(calib_file), "--max-windows", "2", "--window", "64"]
    argv = ["eval", str(out), *common, "--compare-to", str(tiny_dir()), "--json", str(js)]
    assert main([str(a) for a in argv]) == 0
    fid = json.loads(js.read_text())["fidelity"]
    assert fid["kl"] > 0 and 0 < fid["top1"] <= 1 and fid["tokens"] == 2 * 63
    # the same model through two float32 evaluation paths (summation order differs)
    assert math.isclose(fid["ppl"], json.loads(js.read_text())["ppl"], rel_tol=1e-5)
    assert "top-1 agreement" in capsys.readouterr().out
    # the float model against itself: no divergence
    argv = ["eval", str(tiny_dir()), *common, "--compare-to", str(tiny_dir()), "--json", str(js)]
    assert main([str(a) for a in argv]) == 0
    fid = json.loads(js.read_text())["fidelity"]
    assert abs(fid["kl"]) < 1e-6 and fid["top1"] == 1.0 and fid["ppl_ratio"] == 1.0


@pytest.mark.parametrize("method", ["static-rtn", "smoothquant", "mobilequant"])
def test_quantize_integer_only_save_and_eval(method, capsys, tmp_path, tiny_dir, calib_file):
    out, js = tmp_path / "q", tmp_path / "e.json"
    argv = ["quantize", tiny_dir(), "--method", method, "--w-bits", "8", "--a-bits", "8"]
    argv += ["--n-samples", "8", "--seqlen", "32", "--calib", calib_file, "--epochs", "1"]
    state = tmp_path / "mq.pt"
    if method == "mobilequant":
        argv += ["--learn-a16", "--loss", "hidden", "--clip-search", "off", "--no-calib-bos"]
        argv += ["--state", state]
    assert main([str(a) for a in [*argv, "--out", out, "--json", js]]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "edgequant-static" and qc["activation_ranges"]
    assert qc["static"]["ranges"] == ("minmax" if method == "static-rtn" else "mse")
    assert qc["static"]["calib_bos"] is False  # this tokenizer adds no BOS (test_static)
    if method == "mobilequant":  # the knobs given, not the defaults
        saved = torch.load(state, weights_only=True)["config"]
        assert saved["learn_a16"] is True and saved["loss"] == "hidden"
        assert saved["clip_search"] == "off"
    summary = json.loads(js.read_text())
    assert summary["method"] == method and summary["a_bits"] == 8
    ev = tmp_path / "ev.json"
    args = ["eval", out, "--ppl", calib_file, "--max-windows", "1", "--window", "64"]
    assert main([str(a) for a in [*args, "--json", ev]]) == 0
    assert json.loads(ev.read_text())["ppl"] > 1
    code, err = run(capsys, "generate", out, "--prompt", "hello")
    assert code == 2 and "integer-only checkpoint" in err[-1]


def test_integer_only_rejects_bad_bits(capsys, tmp_path, tiny_dir, calib_file):
    argv = ["quantize", tiny_dir(), "--method", "static-rtn", "--a-bits", "4"]
    code, err = run(capsys, *argv, "--calib", calib_file)
    assert code == 2 and "a_bits 8 or 16" in err[-1]


def test_loss_samples_reaches_the_search_and_bad_values_are_refused(
    capsys, tmp_path, tiny_dir, calib_file
):
    from edgequant.config import W3_LOSS_SAMPLES
    from edgequant.recipe import Recipe

    search, model = tmp_path / "s.safetensors", tiny_dir()
    args = quantize_args(model, tmp_path / "q", calib_file, "--save-search", search)
    assert main([str(a) for a in [*args, "--loss-samples", "2"]]) == 0
    assert Recipe.load(search).awq.loss_samples == 2
    # left out: the width's default, recorded as it ran (32 samples and down_proj on every
    # token at 3 bits, the Gram form on the token sample at 4)
    default = quantize_args(model, tmp_path / "d", calib_file, "--save-search", search)
    assert main([str(a) for a in [*default, "--w-bits", "3"]]) == 0
    saved = Recipe.load(search).awq
    assert (saved.loss_samples, saved.single_all_tokens) == (W3_LOSS_SAMPLES, True)
    assert isinstance(saved.bf16_matmul, bool)
    default = quantize_args(model, tmp_path / "d4", calib_file, "--save-search", search)
    assert main([str(a) for a in [*default, "--w-bits", "4"]]) == 0
    saved = Recipe.load(search).awq
    assert (saved.loss_samples, saved.single_all_tokens) == (0, False)
    # explicit settings win over the width's
    off = quantize_args(model, tmp_path / "o", calib_file, "--save-search", search)
    argv = [*off, "--w-bits", "3", "--loss-samples", "4", "--no-single-all-tokens"]
    assert main([str(a) for a in argv]) == 0
    saved = Recipe.load(search).awq
    assert (saved.loss_samples, saved.single_all_tokens) == (4, False)
    exact = quantize_args(model, tmp_path / "e", calib_file, "--save-search", search)
    assert main([str(a) for a in [*exact, "--w-bits", "3", "--search", "exact"]]) == 0
    saved = Recipe.load(search).awq
    assert (saved.loss_samples, saved.bf16_matmul) == (0, False)
    bad = quantize_args(model, tmp_path / "r", calib_file, "--loss-samples", "-1")
    code, err = run(capsys, *bad)
    assert code == 2 and "must be >= 0" in err[-1] and not (tmp_path / "r").exists()
