"""benchmarks/robustness.py: which calibration runs a resumed study skips."""

import importlib.util
import sys
from pathlib import Path

bench = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(bench))  # robustness.py imports quality.py's method table
spec = importlib.util.spec_from_file_location("robustness", bench / "robustness.py")
robustness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(robustness)

BASE = {"model": "m", "bits": 3, "method": "awq", "calib": "pydocs", "n_samples": 8}


def rows(*evals: str, **extra) -> dict:
    out = [BASE | {"eval": t, "ppl": 10.0} | extra for t in evals]
    return {robustness.key(r): r for r in out}


def test_a_run_is_measured_only_with_both_texts_on_as_many_windows():
    base = BASE | {"max_windows": 8}
    assert robustness.measured(rows("pydocs", "austen", max_windows=8), base)
    assert robustness.measured(rows("pydocs", "austen"), base)  # older rows: 8 windows
    assert not robustness.measured(rows("pydocs", max_windows=8), base)  # interrupted
    assert not robustness.measured(rows("pydocs", "austen", max_windows=4), base)
    assert not robustness.measured(rows("pydocs", "austen"), base | {"n_samples": 16})


def test_the_size_table_states_what_a_smaller_calibration_set_costs():
    runs = {}
    for n, ppl in ((8, 12.5), (128, 10.0)):
        runs |= rows("pydocs", "austen", n_samples=n, max_windows=8)
        for r in list(runs.values())[-2:]:
            r["ppl"] = ppl
    gptq = rows("pydocs", "austen", n_samples=128, max_windows=8, method="gptq", ppl=20.0)
    out = "\n".join(robustness.render_sizes(list((runs | gptq).values())))
    assert "- m W3: AWQ on 8 blocks is below GPTQ on 128 (12.50 vs 20.00 / 12.50 vs 20.00)" in out
    assert "- m W3 awq: 8 blocks instead of 128 cost +2.50 / +2.50 perplexity" in out
    assert "| m | W3 | awq | 8 | 12.500 | +2.500 | 12.500 | +2.500 |" in out
    only_full = rows("pydocs", "austen", n_samples=128, max_windows=8)
    assert robustness.render_sizes(list(only_full.values())) == []  # no size study yet
