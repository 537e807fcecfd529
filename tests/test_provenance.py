"""benchmarks/provenance.py: rows say which machine and commit measured them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import provenance  # noqa: E402

CPUINFO = """processor\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni
processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
"""


def test_flags_are_the_first_processors_and_name_the_bf16_path():
    flags = provenance.cpu_flags(CPUINFO)
    assert {"avx512f", "avx512_vnni"} <= flags and "avx512_bf16" not in flags
    assert provenance.cpu_flags("processor\t: 0\n") == set()
    assert "(AVX-512, no AVX512-BF16)" in provenance.machine(flags)
    assert "(AVX-512 with AVX512-BF16)" in provenance.machine(flags | {"avx512_bf16"})
    assert "AVX" not in provenance.machine({"neon"})


def test_a_stamp_names_this_checkout_and_rows_are_counted_per_machine():
    s = provenance.stamp()
    assert len(s["commit"]) >= 7 and int(s["commit"], 16) >= 0  # a hex hash
    rows = [s, s, {"ppl": 1.0}, s | {"machine": "other"}]
    lines = provenance.measured_on(rows)
    assert f"- {s['machine']} at {s['commit']}: 2 rows" in lines
    assert "- not recorded: 1 row" in lines and f"- other at {s['commit']}: 1 row" in lines
