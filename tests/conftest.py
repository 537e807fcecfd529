"""Tiny random models built from transformers config classes, with a small trained tokenizer."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "which",
    "be",
    "are",
    "quantization",
    "weight",
    "activation",
    "scale",
    "group",
    "channel",
    "model",
    "layer",
    "block",
    "token",
    "cache",
    "python",
    "function",
    "class",
    "module",
    "return",
    "value",
    "error",
    "memory",
    "device",
    "integer",
    "float",
    "round",
    "clip",
    "search",
    "grid",
    "alpha",
]


def synthetic_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, n_words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines)


def make_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [synthetic_text(3000, s) for s in range(3)],
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<bos>", "<eos>"],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<bos>", eos_token="<eos>"
    )


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """make_tokenizer's, starting every sequence with <bos> (as Gemma's does)."""
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    return tok


def llama(gqa: bool = True, layers: int = 2, seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return _randomize_norms(LlamaForCausalLM(cfg).eval())


def gemma3(
    layers: int = 2, seed: int = 0, hidden: int = 64, kv_heads: int = 4, head_dim: int = 0, **extra
) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        **extra,
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // 4,
        max_position_embeddings=256,
        sliding_window=16,
    )
    return _randomize_norms(Gemma3ForCausalLM(cfg).eval())


def opt(layers: int = 2, seed: int = 0, hidden: int = 64) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=320,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
    )
    return _randomize_norms(OPTForCausalLM(cfg).eval())


def _randomize_norms(model):
    """Non-trivial norm weights and biases, so that folding into them is really tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


FACTORIES = {"llama": llama, "gemma3": gemma3, "opt": opt}


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """Save a tiny Llama with tokenizer to a directory the CLI can load."""

    def make(arch: str = "llama", **kw):
        path = tmp_path / f"tiny-{arch}"
        FACTORIES[arch](**kw).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(synthetic_text(20000, seed=7))
    return path
