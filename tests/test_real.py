"""A few tests on the real SmolLM2-135M and the Debian text sources (offline)."""

import pytest
import torch

from edgequant.awq import awq_quantize
from edgequant.config import AWQConfig, CalibConfig, QuantConfig
from edgequant.data import calibration_ids, evaluation_ids, get_source
from edgequant.evaluate import perplexity
from edgequant.recipe import Recipe, apply_recipe

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    from edgequant.zoo import load

    return load("smollm2-135m")


def test_austen_decoded():
    src = get_source("austen")
    assert src.evaluation.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in src.evaluation
    assert len(src.calibration) == 5 and src.evaluation not in src.calibration


def test_pydocs_eval_is_held_out():
    src = get_source("pydocs")
    assert len(src.calibration) > 200
    assert not any(doc in src.evaluation for doc in src.calibration if len(doc) > 200)


def test_w3_awq_beats_rtn_on_smollm2(smollm2):
    model, tok = smollm2
    ids = evaluation_ids(tok, get_source("austen"))[:4096]

    def ppl() -> float:
        return perplexity(model, tok, ids, window=512, max_windows=4, progress=False).ppl

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fp = ppl()
        q = QuantConfig(3, 64)
        apply_recipe(model, Recipe(quant=q))
        rtn = ppl()
        model.load_state_dict(state)
        calib = calibration_ids(tok, CalibConfig(n_samples=16, seqlen=256))
        recipe = awq_quantize(model, calib, q, AWQConfig(gram_tokens=2048))
        awq = ppl()
    finally:
        model.load_state_dict(state)
    assert fp < awq < rtn
    assert sum(r["awq_error"] for r in recipe.report) < sum(r["rtn_error"] for r in recipe.report)
    assert torch.isfinite(torch.tensor(awq))


def test_fast_kernels_generate_what_the_reference_does():
    """Greedy decoding of W4 SmolLM2: fused int4 kernels vs the dequantize-and-matmul oracle."""
    from edgequant.checkpoint import finalize
    from edgequant.decoder import Decoder
    from edgequant.generate import SamplingConfig, generate
    from edgequant.zoo import load

    q = QuantConfig(4, 64)
    model, tok = load("smollm2-135m")  # a private copy: finalize swaps its modules
    apply_recipe(model, Recipe(quant=q))
    finalize(model, q)
    prompt = tok("It is a truth universally acknowledged, that")["input_ids"]
    cfg = SamplingConfig(max_new_tokens=32)
    runs = {
        k: generate(Decoder(model, 128, kernel=k), prompt, cfg).tokens for k in ("cpu", "reference")
    }
    assert runs["cpu"] == runs["reference"] and len(runs["cpu"]) == 32
