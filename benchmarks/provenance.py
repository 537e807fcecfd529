"""Where and at which commit a benchmark row was measured: rows from different machines (a CPU
with or without AVX512-BF16 rounds bf16 matmuls differently) must not be read as one run."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    """The checkout's short commit hash ("" outside a git checkout)."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return out.stdout.strip()


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


def machine(flags: set[str] | None = None) -> str:
    """e.g. "x86_64, 2 cores (AVX-512, no AVX512-BF16), torch 2.13.0+cpu, 2 threads"."""
    flags = cpu_flags() if flags is None else flags
    isa = ""
    if "avx512f" in flags:
        isa = (
            " (AVX-512 with AVX512-BF16)"
            if "avx512_bf16" in flags
            else " (AVX-512, no AVX512-BF16)"
        )
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{isa}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def stamp() -> dict:
    """What a row records about where it was measured."""
    return {"commit": commit(), "machine": machine()}


def measured_on(rows) -> list[str]:
    """Markdown lines: how many of `rows` (dicts) each machine and commit measured."""
    count: dict[str, int] = {}
    for r in rows:
        where = f"{r['machine']} at {r['commit']}" if "machine" in r else "not recorded"
        count[where] = count.get(where, 0) + 1
    return [f"- {where}: {n} row{'s' * (n != 1)}" for where, n in sorted(count.items())]
