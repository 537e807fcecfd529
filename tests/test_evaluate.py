import math

import torch
import torch.nn.functional as F
from conftest import llama

from edgequant.evaluate import perplexity


def test_perplexity_matches_manual(tokenizer):
    model = llama()
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, tokenizer, ids, window=64, max_windows=3, progress=False)
    # tokenizer adds no BOS on its own: windows are 64 text tokens, 63 scored each
    total = 0.0
    with torch.no_grad():
        for k in range(3):
            x = ids[k * 64 : (k + 1) * 64].unsqueeze(0)
            total += F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="sum").item()
    assert res.tokens == 3 * 63 and res.windows == 3
    assert math.isclose(res.ppl, math.exp(total / res.tokens), rel_tol=1e-5)
    assert "3 non-overlapping windows of 64 tokens" in res.protocol


def test_window_capped_at_context(tokenizer):
    model = llama()  # max_position_embeddings 256
    ids = torch.randint(0, 300, (600,))
    res = perplexity(model, tokenizer, ids, window=2048, progress=False)
    assert res.windows == 2 and "windows of 256 tokens" in res.protocol
