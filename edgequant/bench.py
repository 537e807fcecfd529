"""`edgequant bench`: prefill and decode speed, time to first token, peak memory, model bytes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
from pathlib import Path

import torch

from edgequant.config import STATIC_QUANT_METHOD
from edgequant.decoder import Decoder
from edgequant.errors import EdgequantError
from edgequant.generate import SamplingConfig, generate

PROMPT_TEXT = (
    "Quantization maps the weights of a neural network onto a small set of integer levels, "
    "so that a model needs less memory and moves fewer bytes for every token it produces. "
)


def load_decoder(name_or_path: str, max_seq: int, kernel: str = "cpu", lm_head: str = "int8"):
    """(Decoder, tokenizer); the model it was built from is released.

    A packed checkpoint is read as a bare module tree (edgequant.skeleton), without the HF
    model classes; anything else through edgequant.zoo.load.
    """
    from edgequant.checkpoint import quant_method
    from edgequant.skeleton import NotLean, load_skeleton
    from edgequant.zoo import load, load_tokenizer, packed_dir, resolve

    where = Path(resolve(name_or_path))
    if where.is_dir() and quant_method(where) == STATIC_QUANT_METHOD:
        raise EdgequantError(
            f"{name_or_path} is an integer-only checkpoint: its static activation quantizers run "
            "through `edgequant eval` or the ONNX export, not the weight-only decoder"
        )
    model = None
    if (where := packed_dir(name_or_path)) is not None:
        with contextlib.suppress(NotLean):
            model, tok = load_skeleton(where), load_tokenizer(where, lean=True)
    if model is None:
        model, tok = load(name_or_path)
    dec = Decoder(model, max_seq, kernel=kernel, lm_head=lm_head).eval()
    del model
    gc.collect()
    release_free_memory()
    return dec, tok


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS shows what the decoder holds."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n tokens of fixed English text."""
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def weight_bytes(decoder: Decoder) -> int:
    """Bytes of everything the decoder reads per token except the KV cache and RoPE tables."""
    skip = ("k_cache", "v_cache", "cos_", "sin_")
    named = list(decoder.named_buffers()) + list(decoder.named_parameters())
    return sum(
        t.numel() * t.element_size()
        for name, t in named
        if not any(s in name.rsplit(".", 1)[-1] for s in skip)
    )


def peak_rss_mb(reset: bool = False) -> float:
    """The process's resident-set high-water mark (VmHWM); reset=True restarts it (Linux)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench(
    decoder: Decoder, tokenizer, prompt_len: int = 512, new_tokens: int = 128, runs: int = 3
) -> dict:
    """Medians over `runs` generations (greedy, no stop token) after one warm-up."""
    ids = prompt_ids(tokenizer, prompt_len)
    cfg = SamplingConfig(max_new_tokens=new_tokens)
    generate(decoder, ids[:32], SamplingConfig(max_new_tokens=8))  # warm-up
    peak_rss_mb(reset=True)
    gens = [generate(decoder, ids, cfg) for _ in range(runs)]
    return {
        "prefill_tok_s": statistics.median(g.prefill_tok_s for g in gens),
        "decode_tok_s": statistics.median(g.decode_tok_s for g in gens),
        "ttft_s": statistics.median(g.prefill_s for g in gens),
        "peak_rss_mb": peak_rss_mb(),
        "model_bytes": weight_bytes(decoder),
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "threads": torch.get_num_threads(),
    }
