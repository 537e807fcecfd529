"""Folding AWQ scales into the previous op leaves the float model's outputs unchanged."""

import pytest
import torch
from conftest import FACTORIES, llama

from edgequant.arch import arch_for, blocks_of, can_fold, fold_into_prev


def fold_random_scales(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = arch_for(model)
    folded = 0
    for block in blocks_of(model, spec):
        for g in spec.groups:
            if not can_fold(block, g):
                continue
            first = block.get_submodule(g.linears[0])
            s = torch.exp(torch.randn(first.in_features, generator=gen))  # spans ~e^-3..e^3
            fold_into_prev(block.get_submodule(g.prev), s, spec.norm)
            for name in g.linears:
                block.get_submodule(name).weight.data.mul_(s)
            folded += 1
    return folded


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "llama-mha"])
def test_fold_preserves_outputs(arch):
    model = llama(gqa=False) if arch == "llama-mha" else FACTORIES[arch]()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        n = fold_random_scales(model)
        out = model(ids).logits
    assert n == 2 * len(arch_for(model).groups) - (2 if arch == "llama" else 0)
    assert (out - ref).abs().max() < 1e-4


def test_gqa_skips_v_to_o():
    model = llama(gqa=True)
    spec = arch_for(model)
    block = blocks_of(model, spec)[0]
    assert [g.name for g in spec.groups if not can_fold(block, g)] == ["attn_out"]
