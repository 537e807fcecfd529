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
    """Greedy decoding of W4 SmolLM2: fused kernels vs the dequantize-and-matmul oracle.

    The fast path prefills with bf16 matmuls and decodes in the C++ engine (float32-exact up to
    summation order); the reference path runs every linear as float32 dequantize + matmul with
    the same int8 lm_head. Teacher-forced along the reference's tokens, the fast path must pick
    the same token wherever the reference's top-2 margin exceeds bf16 noise (0.05), and on a
    chat prompt the two free-running greedy generations must be identical for 32 tokens.
    """
    from edgequant.checkpoint import finalize
    from edgequant.decoder import Decoder
    from edgequant.generate import SamplingConfig, generate
    from edgequant.zoo import load

    q = QuantConfig(4, 64)
    model, tok = load("smollm2-135m")  # a private copy: finalize swaps its modules
    apply_recipe(model, Recipe(quant=q))
    finalize(model, q)
    chat = [{"role": "user", "content": "Explain what a Python list is."}]
    prompt = list(tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))
    cfg = SamplingConfig(max_new_tokens=32)
    fast = Decoder(model, 128)
    exact = Decoder(model, 128, kernel="reference", dtype=torch.float32)
    runs = [generate(dec, prompt, cfg).tokens for dec in (fast, exact)]
    assert runs[0] == runs[1] and len(runs[0]) == 32
    # teacher forcing: one decode step at a time along the reference tokens
    text = tok("It is a truth universally acknowledged, that")["input_ids"]
    ref = generate(exact, text, cfg).tokens
    for dec in (fast, exact):
        dec(torch.tensor([text]), 0)
    for i, t in enumerate(ref[:-1]):
        a, b = (dec(torch.tensor([[t]]), len(text) + i) for dec in (fast, exact))
        top2 = b.topk(2).values
        if top2[0] - top2[1] > 0.05:
            assert a.argmax() == b.argmax(), i


def test_lean_tokenizer_is_autotokenizer_on_smollm2():
    from transformers import AutoTokenizer

    from edgequant.zoo import load_tokenizer, resolve

    where = resolve("smollm2-135m")
    lean, full = load_tokenizer(where, lean=True), AutoTokenizer.from_pretrained(where)
    text = get_source("austen").evaluation[:20000] + get_source("pydocs").evaluation[:20000]
    assert lean(text)["input_ids"] == full(text)["input_ids"]
    chat = [{"role": "user", "content": "What is AWQ?"}]
    kw = {"add_generation_prompt": True, "tokenize": False}
    assert lean.apply_chat_template(chat, **kw) == full.apply_chat_template(chat, **kw)
    assert (lean.eos_token_id, lean.bos_token_id) == (full.eos_token_id, full.bos_token_id)
