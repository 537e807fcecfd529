"""Folding AWQ scales into the previous op leaves the float model's outputs unchanged."""

from dataclasses import replace

import pytest
import torch
from conftest import FACTORIES, gemma3, llama

from edgequant.arch import arch_for, blocks_of, fold_index, fold_into_prev


def fold_random_scales(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = arch_for(model)
    folded = 0
    for block in blocks_of(model, spec):
        for g in spec.groups:
            idx = fold_index(block, g)
            s = torch.exp(torch.randn(int(idx.max()) + 1, generator=gen))  # spans ~e^-3..e^3
            fold_into_prev(block.get_submodule(g.prev), s, spec.norm)
            for name in g.linears:
                block.get_submodule(name).weight.data.mul_(s[idx])
            folded += 1
    return folded


VARIANTS = {
    "llama-mha": lambda: llama(gqa=False),
    # like Gemma-3-270M: one key/value head, head_dim * heads != hidden
    "gemma3-gqa": lambda: gemma3(kv_heads=1, head_dim=32),
}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", *VARIANTS])
def test_fold_preserves_outputs(arch):
    model = VARIANTS[arch]() if arch in VARIANTS else FACTORIES[arch]()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        n = fold_random_scales(model)
        out = model(ids).logits
    assert n == 2 * len(arch_for(model).groups)
    assert (out - ref).abs().max() < 1e-4


def test_gqa_v_to_o_repeats_each_kv_channel_per_query_head():
    model = llama(gqa=True)
    cfg, spec = model.config, arch_for(model)
    block = blocks_of(model, spec)[0]
    attn_out = next(g for g in spec.groups if g.name == "attn_out")
    idx = fold_index(block, attn_out)
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    assert rep > 1 and idx.shape == (cfg.num_attention_heads * hd,)
    for h in range(cfg.num_attention_heads):
        kv = h // rep
        assert idx[h * hd : (h + 1) * hd].tolist() == list(range(kv * hd, (kv + 1) * hd))
    # without the attention module to read head_dim from, a narrower prev cannot fold
    assert fold_index(block, replace(attn_out, heads=None)) is None
