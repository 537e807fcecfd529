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
