"""benchmarks/quality.py's checks: the fast-vs-exact gap over several AWQ search seeds."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

bench = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(bench))  # quality.py imports provenance.py beside it
spec = importlib.util.spec_from_file_location("quality", bench / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def row(method: str, austen: float, seed: int = 0, bits: int = 3) -> dict:
    r = {"model": "m", "bits": bits, "group_size": 64, "method": method, "quant_seconds": 1.0,
         "ppl": {t: {"ppl": austen} for t in quality.TEXTS}}  # fmt: skip
    return {**r, "seed": seed} if seed else r


def rendered(*rows: dict) -> str:
    return quality.render({"rows": {quality.key(r): r for r in rows}})


def test_seed_rows_have_their_own_key_and_label():
    r0, r1 = row("awq", 10.0), row("awq", 11.0, seed=1)
    assert quality.key(r0) == "m|w3g64|awq" and quality.key(r1) == "m|w3g64|awq|seed1"
    assert "| m | W3 g64 | awq (seed 1) | 11.000 |" in rendered(r0, r1)


def test_fast_vs_exact_compares_the_means_over_seeds():
    base = [row("fp", 5.0, bits=16), row("rtn", 30.0, bits=4)]
    one = rendered(*base, row("awq", 10.3, bits=4), row("awq-exact", 10.0, bits=4))
    assert (
        "FAIL: W4 g64 m austen: awq fast 10.300 vs exact 10.000 (+3.00%; bar: at most +1%)" in one
    )
    # seed 1 pulls the fast mean to 10.05: within 1% of the exact mean (10.0)
    fast = [row("awq", 10.3, bits=4), row("awq", 9.8, seed=1, bits=4)]
    two = rendered(*base, *fast, row("awq-exact", 10.0, bits=4))
    line = next(x for x in two.splitlines() if "fast" in x and "austen" in x)
    assert line.startswith("- PASS: W4 g64 m austen: awq fast 10.050 vs exact 10.000 (+0.50%")
    assert "fast seeds 0,1: 9.800-10.300, exact seed 0: 10.000" in line
    # the other checks still judge the seed-0 row alone
    assert "AWQ 10.300 < RTN 30.000" in two


def test_the_bar_holds_at_w4_and_w3_one_sided_and_only_for_the_default():
    base = [row("fp", 5.0, bits=16), row("rtn", 30.0), row("rtn", 30.0, bits=4)]
    w3 = rendered(*base, row("awq", 10.3), row("awq-exact", 10.0))
    assert "- FAIL: W3 g64 m austen: awq fast 10.300 vs exact 10.000 (+3.00%; bar:" in w3
    # one-sided: a fast search below the exact one is within the bar
    low = rendered(*base, row("awq", 9.5, bits=4), row("awq-exact", 10.0, bits=4))
    assert "- PASS: W4 g64 m austen: awq fast 9.500 vs exact 10.000 (-5.00%" in low
    # no exact row: the default misses it at both widths, a variant misses nothing
    for bits in (4, 3):
        text = rendered(*base, row("awq", 10.3, bits=bits), row("awq-sens", 10.2, bits=bits))
        assert f"- MISSING: W{bits} g64 m: fast vs exact (awq-exact not measured)" in text
        assert text.count("fast vs exact") == 1
    # a variant is reported against the exact search, never judged
    sens = rendered(*base, row("awq", 10.0, bits=4), row("awq-sens", 10.5, bits=4),
                    row("awq-exact", 10.0, bits=4))  # fmt: skip
    assert "- INFO: W4 g64 m austen: awq-sens fast 10.500 vs exact 10.000 (+5.00%)" in sens
    judged = [x for x in sens.splitlines() if "g64 m" in x and not x.startswith("- INFO")]
    assert judged and all(x.startswith("- PASS") for x in judged)  # the default passes


def test_the_gap_is_the_ratio_of_means_and_its_error_the_delta_method():
    fast = [row("awq", p, seed=s) for s, p in enumerate([20.0, 22.0, 21.0])]
    exact = [row("awq-exact", p, seed=s) for s, p in enumerate([20.0, 20.5])]
    gap, se = quality.fast_vs_exact(fast, exact, "austen")
    assert gap == pytest.approx(21.0 / 20.25 - 1)
    # variances of the means 1/3 and 0.125/2: sqrt(1/3 + (21/20.25)^2 / 16) / 20.25
    assert se == pytest.approx(0.031254, rel=1e-4)
    assert quality.fast_vs_exact(fast[:1], exact, "austen")[1] is None  # one seed: no error


def test_the_check_states_the_error_and_names_the_seeds_in_order():
    fast = [row("awq", p, seed=s, bits=4) for s, p in [(2, 20.3), (0, 20.0), (1, 20.1)]]
    exact = [row("awq-exact", p, seed=s, bits=4) for s, p in [(1, 20.2), (0, 20.0)]]
    text = rendered(row("rtn", 30.0, bits=4), *fast, *exact)
    line = next(x for x in text.splitlines() if "awq fast" in x and "austen" in x)
    assert line.startswith("- PASS: W4 g64 m austen: awq fast 20.133 vs exact 20.100 (+0.17% ± ")
    assert "fast seeds 0,1,2: 20.000-20.300, exact seeds 0,1: 20.000-20.200" in line


def single_w2() -> list[dict]:
    # RTN, plain GPTQ and AWQ at W2 g64 (Austen and pydocs alike)
    return [row(m, v, bits=2) for m, v in (("rtn", 900.0), ("gptq", 90.0), ("awq", 80.0))]


def test_seed_repeats_stay_out_of_the_int2_table():
    w2 = single_w2()
    text = rendered(*w2, row("awq+gptq", 50.0, bits=2), row("awq+gptq", 79.0, seed=1, bits=2))
    int2 = text.split("## INT2")[1].split("## Checks")[0]
    assert int2.count("| m | W2 g64 |") == 1 and "FAIL" not in text


def int2_checks(*rows: dict) -> list[str]:
    return [x for x in rendered(*rows).splitlines() if "W2 g64 m austen" in x]


def test_int2_counts_each_method_with_its_better_column_order():
    w2 = single_w2()
    # act-order GPTQ beats plain AWQ+GPTQ, but AWQ+GPTQ with act-order beats both
    both = [*w2, row("gptq-act", 60.0, bits=2), row("awq+gptq", 70.0, bits=2)]
    assert int2_checks(*both) == [
        "- FAIL: W2 g64 m austen: AWQ+GPTQ (awq+gptq) 70.00 lowest (next: gptq-act 60.00)"
    ]
    fixed = int2_checks(*both, row("awq+gptq-act", 40.0, bits=2))
    assert fixed == [
        "- PASS: W2 g64 m austen: AWQ+GPTQ (awq+gptq-act) 40.00 lowest (next: gptq-act 60.00)"
    ]
    # a single method never measured (here GPTQ in either order) cannot pass
    no_gptq = [r for r in w2 if r["method"] != "gptq"] + [row("awq+gptq", 10.0, bits=2)]
    assert int2_checks(*no_gptq)[0].startswith("- FAIL:")


@pytest.mark.parametrize("fast", sorted(quality.EXACT_OF))
def test_each_fast_row_is_compared_with_an_exact_search_that_clips_alike(fast):
    exact = quality.EXACT_OF[fast]
    (_, f, _), (_, e, _) = quality.METHODS[fast], quality.METHODS[exact]
    assert f.search == "fast" and e.search == "exact"
    assert (f.clip_tokens, f.clip_all, f.clip_form) == (e.clip_tokens, e.clip_all, e.clip_form)


def test_a_saved_search_matches_the_label_that_ran_it():
    from edgequant.config import AWQConfig

    label = {m: cfg for m, (_, cfg, _) in quality.METHODS.items()}
    w3 = AWQConfig(loss_samples=32, single_all_tokens=True, bf16_matmul=True)  # W3 default, GPU
    assert quality.search_matches(w3, label["awq"], 3)
    assert not quality.search_matches(w3, label["awq-gram"], 3)
    # the W3 default before down_proj was scored on every token is awq-ls4's now
    w3_ls4 = AWQConfig(loss_samples=4, single_all_tokens=False, bf16_matmul=True)
    assert quality.search_matches(w3_ls4, label["awq-ls4"], 3)
    assert not quality.search_matches(w3_ls4, label["awq"], 3)
    # a default W4 search on a slow-bf16 CPU
    gram = AWQConfig(loss_samples=0, single_all_tokens=False, bf16_matmul=False)
    assert quality.search_matches(gram, label["awq"], 4)
    assert quality.search_matches(gram, label["awq-gram"], 3)
    assert not quality.search_matches(gram, label["awq"], 3)
    # a label that fixes float32 refuses a bf16 search; an exact search's flag never counts
    assert not quality.search_matches(replace(gram, bf16_matmul=True), label["awq-fp32"], 3)
    old_exact = AWQConfig(search="exact", loss_samples=0, single_all_tokens=False, bf16_matmul=True)
    assert quality.search_matches(old_exact, label["awq-exact"], 3)
    assert quality.search_matches(None, None, 3) and not quality.search_matches(gram, None, 3)


def test_the_paired_gap_compares_seed_by_seed_over_the_seeds_both_measured():
    # fast runs 1.0-1.5 above exact at every shared seed; the unpaired spread is far larger
    fast = [row("awq", p, seed=s) for s, p in [(0, 21.0), (1, 25.0), (2, 23.5), (3, 30.0)]]
    exact = [row("awq-exact", p, seed=s) for s, p in [(0, 20.0), (1, 24.0), (2, 22.0)]]
    gap, se, seeds = quality.paired_gap(fast, exact, "austen")
    assert seeds == [0, 1, 2]  # seed 3 has no exact partner
    assert gap == pytest.approx((1.0 + 1.0 + 1.5) / 3 / 22.0)
    # differences 1, 1, 1.5: stdev 0.288675 / sqrt(3) / 22
    assert se == pytest.approx(0.288675 / 3**0.5 / 22.0, rel=1e-5)
    assert quality.paired_gap(fast, exact[:1], "austen") is None  # one shared seed
    text = rendered(row("rtn", 40.0), *fast, *exact)
    line = next(x for x in text.splitlines() if "awq fast" in x and "austen" in x)
    assert line.endswith(f"; paired over seeds 0,1,2: {gap:+.2%} ± {se:.2%}; bar: at most +1%)")


def test_every_row_that_records_its_search_ran_what_its_label_names():
    from edgequant.recipe import _awq_config

    rows = quality.load_results(quality.RESULTS / "quality.json")["rows"].values()
    recorded = [r for r in rows if r.get("awq") and r["method"] in quality.METHODS]
    assert recorded
    for r in recorded:
        saved = replace(_awq_config(r["awq"]), seed=0)
        assert quality.search_matches(saved, quality.METHODS[r["method"]][1], r["bits"]), r
