"""Build (once, cached) and load the C++ decode engine; None where this CPU or compiler can't.

The engine needs AVX512-BF16 and VNNI and a C++ compiler; it is compiled on first use with torch's
cpp_extension into $EDGEQUANT_CACHE/build/<hash> (about a minute), then loads in well under a
second. Everything it computes has a pure-torch path (edgequant.kernels.cpu), which tests
compare it against.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "engine.cpp"
HEADERS = tuple(Path(__file__).parent / "csrc" / h for h in ("kernels.h", "attention.h"))
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]


def cpu_supported() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return all(f in flags for f in ("avx512bw", "avx512_bf16", "avx512_vnni"))


@cache
def load():
    """The compiled module, or None (with a warning saying why)."""
    from edgequant.zoo import cache_dir

    if not cpu_supported():
        return None
    code = b"".join(f.read_bytes() for f in (SOURCE, *HEADERS))
    digest = hashlib.sha256(code + torch.__version__.encode()).hexdigest()[:16]
    build = cache_dir() / "build" / f"engine-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name="edgequant_engine",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: the torch kernels still run
        warnings.warn(f"edgequant: C++ engine unavailable ({e}); using torch kernels", stacklevel=2)
        return None
