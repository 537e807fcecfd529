"""`edgequant report`: figures from the committed benchmark JSON, rendered into one page."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from edgequant.cli import main  # noqa: E402
from edgequant.errors import EdgequantError  # noqa: E402
from edgequant.report import read_results, write_report  # noqa: E402

RESULTS = Path(__file__).parent.parent / "benchmarks" / "results"


def synthetic(tmp_path) -> list[Path]:
    fid = {"rows": {"m|w4g64|awq|austen": {"model": "m", "bits": 4, "group_size": 64,
           "method": "awq", "text": "austen", "quant_seconds": 1.0,
           "fidelity": {"kl": 0.1, "top1": 0.8, "ppl_ratio": 1.1}}}}  # fmt: skip
    rob = {"rows": [{"model": "m", "method": m, "bits": 3, "calib": c, "eval": e, "ppl": 20.0 + i}
                    for i, (m, c, e) in enumerate((m, c, e) for m in ("awq", "gptq")
                    for c in ("pydocs", "austen") for e in ("pydocs", "austen"))]}  # fmt: skip
    rob["rows"] += [{"model": "m", "method": m, "bits": 3, "calib": "pydocs", "n_samples": n,
                     "eval": e, "ppl": 30.0 - n / 8} for m in ("awq", "gptq") for n in (8, 16)
                    for e in ("pydocs", "austen")]  # fmt: skip
    gen = {"generations": [{"prompt": "Once <upon>", "outputs": {"fp": "a", "awq": "b & c"}}]}
    paths = []
    for name, data in (("fidelity", fid), ("robustness", rob), ("generations", gen)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    return paths


def test_report_draws_every_figure(tmp_path):
    inputs = [RESULTS / "quality.json", RESULTS / "speed.json", *synthetic(tmp_path)]
    drawn = write_report(inputs, tmp_path / "r.html")
    assert set(drawn) >= {
        "perplexity-vs-bits", "speed", "fidelity", "robustness", "robustness-size", "generations"
    }  # fmt: skip
    page = (tmp_path / "r.html").read_text()
    for fid in drawn:
        assert f'id="{fid}"' in page
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == len(drawn) - 1  # generations are a table
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "Once &lt;upon&gt;" in page and "b &amp; c" in page  # text is escaped


def test_report_draws_every_figure_from_the_committed_results(tmp_path):
    names = ("quality", "speed", "fidelity", "robustness", "generations", "w8a8")
    drawn = write_report([RESULTS / f"{n}.json" for n in names], tmp_path / "r.html")
    assert set(drawn) == {
        "perplexity-vs-bits",
        "awq-block-error",
        "speed",
        "fidelity",
        "robustness",
        "robustness-size",
        "w8a8",
        "generations",
    }


def test_report_names_what_it_could_not_draw(tmp_path):
    drawn = write_report([RESULTS / "speed.json"], tmp_path / "r.html")
    assert drawn == ["speed"]
    assert "needs quality results" in (tmp_path / "r.html").read_text()


def test_size_figure_needs_a_size_study(tmp_path):
    rob = {"rows": [{"model": "m", "method": "awq", "bits": 3, "calib": "pydocs", "eval": "austen",
                     "ppl": 20.0}]}  # fmt: skip
    (tmp_path / "robustness.json").write_text(json.dumps(rob))
    drawn = write_report([tmp_path / "robustness.json"], tmp_path / "r.html")
    assert drawn == ["robustness"]
    assert (
        "calibration-set size (pydocs calibration) (the robustness results hold no data"
        in (tmp_path / "r.html").read_text()
    )


def test_report_rejects_unknown_json(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(EdgequantError, match="not a benchmark result"):
        read_results([bad])
    assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(EdgequantError, match="a second quality result after .*quality.json"):
        read_results([RESULTS / "quality.json", RESULTS / "quality_gpu.json"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "rep"
    script = Path(__file__).parent.parent / "benchmarks" / "render_report.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(out)], check=True, capture_output=True
    )
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    from PIL import Image

    with Image.open(out / "report.png") as im:  # the whole page, down to the generations
        assert 3000 < im.height < 12000
        assert (
            im.convert("L").crop((0, im.height - 60, im.width, im.height - 40)).getextrema()[0]
            < 250
        )
