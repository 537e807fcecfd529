"""benchmarks/provenance.py: rows say which machine and commit measured them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "(AVX-512, no AVX512-BF16)" in provenance.machine(flags=flags)
    assert "(AVX-512 with AVX512-BF16)" in provenance.machine(flags=flags | {"avx512_bf16"})
    both = flags | {"avx512_bf16", "amx_bf16"}
    assert "(AVX-512 with AVX512-BF16 and AMX-BF16)" in provenance.machine(flags=both)
    assert "(no AVX-512)" in provenance.machine(flags={"sse2", "avx2"})
    assert "(" not in provenance.machine(flags={"neon"})  # not x86: nothing claimed


def test_rows_are_counted_per_machine_and_commit():
    rows = [{"machine": "a", "commit": "1"}] * 2 + [{"ppl": 1.0}, {"machine": "b", "commit": "1"}]
    rows += [{"evaluated_on": "GPU", "commit": "2"}, {"commit": "3"}]
    assert provenance.measured_on(rows) == [
        "- GPU (host not recorded) at 2: 1 row",
        "- a at 1: 2 rows",
        "- b at 1: 1 row",
        "- machine not recorded, at 3: 1 row",
        "- not recorded: 1 row",
    ]


def in_git_checkout() -> bool:
    here = str(Path(__file__).parent)
    return (
        bool(shutil.which("git"))
        and subprocess.run(["git", "-C", here, "rev-parse"]).returncode == 0
    )


@pytest.mark.skipif(not in_git_checkout(), reason="not a git checkout")
def test_a_stamp_names_this_checkout():
    s = provenance.stamp()
    head = s["commit"].removesuffix("+dirty")
    assert len(head) >= 7 and int(head, 16) >= 0  # a short hash
    assert s["machine"] == provenance.machine()
