"""benchmarks/awq_objective.py's coarse-to-fine pick: the whole grid's pick on unimodal
curves, in about half the points; a curve with two minima can fool it (what it measures)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "awq_objective", Path(__file__).parent.parent / "benchmarks" / "awq_objective.py"
)
objective = importlib.util.module_from_spec(spec)
sys.modules["awq_objective"] = objective
spec.loader.exec_module(objective)


@pytest.mark.parametrize("step", range(1, 25))
def test_coarse_pick_finds_the_minimum_of_a_strictly_unimodal_curve(step):
    gen = random.Random(step)
    for m in range(20):
        for _ in range(20):  # random strictly decreasing run to m, strictly increasing after
            rise = [gen.uniform(0.01, 1.0) for _ in range(20)]
            vals = [sum(rise[min(i, m) : max(i, m)]) for i in range(20)]
            assert objective.coarse_pick(vals, step) == m


def test_coarse_pick_can_miss_a_narrow_minimum_and_breaks_ties_low():
    vals = [1.0] * 20
    assert objective.coarse_pick(vals, 4) == 0
    vals[10] = 0.5  # the coarse pass sees 0, 4, 8, 12, 16, 19, all equal: refines near 0
    assert objective.coarse_pick(vals, 4) == 0 and objective.coarse_pick(vals, 1) == 10
