"""`edgequant generate | chat | bench` on a tiny quantized checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from edgequant.cli import main


@pytest.fixture
def ckpt(tmp_path, tiny_dir):
    out = tmp_path / "w4"
    argv = ["quantize", tiny_dir(), "--method", "rtn", "--group-size", "32", "--out", out]
    assert main([str(a) for a in argv]) == 0
    return out


def test_generate_streams_text(capsys, ckpt):
    argv = ["generate", str(ckpt), "--prompt", "the model of the", "--max-new-tokens", "8"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "tok/s" in err
    sampled = [*argv, "--temperature", "0.9", "--top-p", "0.9", "--seed", "1"]
    texts = []
    for _ in range(2):
        assert main(sampled) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].endswith("\n")  # the same seed, the same text


def test_bench_writes_json(capsys, tmp_path, ckpt):
    js = tmp_path / "b.json"
    argv = ["bench", str(ckpt), "--prompt-tokens", "64", "--new-tokens", "8", "--runs", "2"]
    assert main([*argv, "--threads", "1", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    keys = ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb", "model_bytes")
    assert all(res[k] > 0 for k in keys) and res["threads"] == 1
    assert "decode_tok_s" in capsys.readouterr().out


def test_chat_through_a_pipe(ckpt):
    """Two turns typed into the real command, then an empty line ends it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "edgequant.cli", "chat", str(ckpt), "--max-new-tokens", "6"],
        input="the scale of the group\nand the layer\n\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("tok/s]") == 2 and done.stdout.count("> ") == 3
    assert "empty line" in done.stderr


def test_unsupported_model_for_generation(capsys, tmp_path, tiny_dir):
    code = main(["generate", str(tiny_dir("opt")), "--prompt", "x"])
    assert code == 2 and "no lean decoder" in capsys.readouterr().err
