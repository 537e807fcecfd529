import math

import torch
import torch.nn.functional as F
from conftest import llama

from edgequant.config import QuantConfig
from edgequant.evaluate import fidelity, perplexity
from edgequant.recipe import Recipe, apply_recipe


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


def test_fidelity_of_a_model_with_itself(tokenizer):
    model = llama()
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(1))
    res = fidelity(model, model, tokenizer, ids, window=64, max_windows=3, progress=False)
    assert abs(res.kl) < 1e-6 and res.top1 == 1.0 and math.isclose(res.ppl_ratio, 1.0)
    ppl = perplexity(model, tokenizer, ids, window=64, max_windows=3, progress=False)
    assert math.isclose(res.ref_ppl, ppl.ppl, rel_tol=1e-6) and res.tokens == ppl.tokens


def test_fidelity_matches_direct_computation(tokenizer):
    model, other = llama(seed=0), llama(seed=0)
    q = QuantConfig(3, 32)
    apply_recipe(other, Recipe(quant=q))  # RTN W3
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(2))
    res = fidelity(other, model, tokenizer, ids, window=64, max_windows=2, progress=False)
    kl = agree = 0.0
    with torch.no_grad():
        for k in range(2):
            x = ids[k * 64 : (k + 1) * 64].unsqueeze(0)
            p = F.log_softmax(model(x).logits[0, :-1], -1)
            r = F.log_softmax(other(x).logits[0, :-1], -1)
            kl += F.kl_div(r, p, log_target=True, reduction="sum").item()
            agree += (p.argmax(-1) == r.argmax(-1)).sum().item()
    assert res.kl > 0 and math.isclose(res.kl, kl / res.tokens, rel_tol=1e-4)
    assert res.top1 == agree / res.tokens
    assert math.isclose(res.ppl, perplexity(other, tokenizer, ids, 64, 2, False).ppl, rel_tol=1e-5)
