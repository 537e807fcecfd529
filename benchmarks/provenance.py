"""Where and at which commit a benchmark row was measured: rows from different machines (a CPU
with or without AVX512-BF16 rounds bf16 matmuls differently) must not be read as one run.
A benchmark takes its stamp once, when it starts, so every row of a run names the code it ran.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    """The checkout's short commit hash, "+dirty" where tracked files differ from it ("" outside
    a git checkout)."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent
            )
        except OSError:  # no git
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + "+dirty" * bool(head and dirty)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_isa(flags: set[str]) -> str:
    """What decides the CPU's bf16 matmul path: "" where the flags are not x86's."""
    if "avx512f" in flags:
        bf16 = ["AVX512-BF16"] * ("avx512_bf16" in flags) + ["AMX-BF16"] * ("amx_bf16" in flags)
        return "AVX-512 with " + " and ".join(bf16) if bf16 else "AVX-512, no AVX512-BF16"
    return "no AVX-512" if "sse2" in flags else ""


def machine(device: str | None = None, flags: set[str] | None = None) -> str:
    """e.g. "x86_64, 2 cores (AVX-512, no AVX512-BF16), torch 2.13.0+cpu, 2 threads", and the
    accelerator's name where `device` is one (e.g. "cuda")."""
    isa = cpu_isa(cpu_flags() if flags is None else flags)
    out = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        f"{f' ({isa})' if isa else ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if device and torch.device(device).type == "cuda":
        out += f"; {torch.cuda.get_device_name(torch.device(device))}"
    return out


def stamp(device: str | None = None) -> dict:
    """What each row of a run records about where it was measured (take it once per run)."""
    return {"commit": commit(), "machine": machine(device)}


def measured_on(rows) -> list[str]:
    """Markdown lines: how many of `rows` (dicts) each machine and commit measured."""
    count: dict[str, int] = {}
    for r in rows:
        if "machine" in r:
            where = f"{r['machine']} at {r.get('commit', '?')}"
        elif "evaluated_on" in r:  # older GPU rows of quality.py: the GPU, not its host
            where = f"{r['evaluated_on']} (host not recorded) at {r.get('commit', '?')}"
        elif "commit" in r:
            where = f"machine not recorded, at {r['commit']}"
        else:
            where = "not recorded"
        count[where] = count.get(where, 0) + 1
    return [f"- {where}: {n} row{'s' * (n != 1)}" for where, n in sorted(count.items())]
