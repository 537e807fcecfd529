"""benchmarks/quality.py: the fast-vs-exact check of issue #2 over AWQ search seeds."""

import importlib.util
import sys
from pathlib import Path

import pytest

bench = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(bench))
spec = importlib.util.spec_from_file_location("quality", bench / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def row(method: str, seed: int, austen: float, pydocs: float = 10.0, bits: int = 4) -> dict:
    r = {"model": "m", "bits": bits, "group_size": 64, "method": method, "quant_seconds": 1.0}
    r["ppl"] = {"austen": {"ppl": austen}, "pydocs": {"ppl": pydocs}}
    return r | ({"seed": seed} if seed else {})


def table(*rows: dict) -> dict:
    return {quality.key(r): r for r in rows}


def test_the_gap_is_the_ratio_of_means_and_its_error_the_delta_method():
    fast = [row("awq", s, p) for s, p in enumerate([20.0, 22.0, 21.0])]
    exact = [row("awq-exact", s, p) for s, p in enumerate([20.0, 20.5])]
    gap, se = quality.fast_vs_exact(fast, exact, "austen")
    assert gap == pytest.approx(21.0 / 20.25 - 1)
    # variances of the means: 1 / 3 and 0.125 / 2; sqrt(1/3 + (21/20.25)^2 / 16) / 20.25
    assert se == pytest.approx(0.031254, rel=1e-4)
    assert quality.fast_vs_exact(fast[:1], exact, "austen")[1] is None  # one seed: no error


def test_the_check_judges_the_mean_over_seeds_and_names_them_in_order():
    rows = table(
        row("rtn", 0, 30.0, 30.0),
        *(row("awq", s, p, 10.0) for s, p in [(2, 20.3), (0, 20.0), (1, 20.1)]),
        *(row("awq-exact", s, p, 9.8) for s, p in [(1, 20.2), (0, 20.0)]),
    )
    checks = dict(quality.awq_checks(rows, rows["m|w4g64|awq"]))
    austen = next(m for m in checks if "austen: awq fast" in m)
    pydocs = next(m for m in checks if "pydocs: awq fast" in m)
    assert checks[austen] is True  # 20.133 vs 20.1: +0.17%
    assert checks[pydocs] is False  # 10.0 vs 9.8: +2.04%
    assert "fast seeds 0,1,2: 20.000-20.300, exact seeds 0,1: 20.000-20.200" in austen
    assert "+0.17% ± " in austen and "s.e." in austen


def test_one_seed_a_side_is_compared_without_an_error_term():
    rows = table(row("rtn", 0, 30.0), row("awq", 0, 20.0), row("awq-exact", 0, 19.0))
    text = quality.render({"rows": rows})
    assert "FAIL: W4 g64 m austen: awq fast 20.000 vs exact 19.000 (+5.26%, within 1%)" in text
