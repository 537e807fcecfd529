"""The lean decoder against HF's forward, the fast kernels against the reference, generation."""

import pytest
import torch
from conftest import gemma3, llama, opt
from transformers import Qwen3Config, Qwen3ForCausalLM

from edgequant.checkpoint import finalize
from edgequant.config import QuantConfig
from edgequant.decoder import Decoder
from edgequant.errors import EdgequantError
from edgequant.generate import Chat, SamplingConfig, generate, sample
from edgequant.kernels import engine
from edgequant.recipe import Recipe, apply_recipe


def qwen3():
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).eval()


def gemma3_mixed():
    """Window 16, one global layer among local ones, each with its own RoPE base."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    return gemma3(layers=3, layer_types=types)


MODELS = {"llama": llama, "gemma3": gemma3_mixed, "qwen3": qwen3}


def quantized(factory, bits=4, group=32):
    model = factory()
    q = QuantConfig(bits, group)
    apply_recipe(model, Recipe(quant=q))
    finalize(model, q)
    return model


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("quant", [False, True])
def test_matches_hf_forward_in_float32(arch, quant):
    model = quantized(MODELS[arch]) if quant else MODELS[arch]()
    ids = torch.randint(0, 320, (1, 40))  # longer than gemma3's window of 16
    with torch.no_grad():
        ref = model(ids).logits[0]
    dec = Decoder(model, 64, kernel="reference", dtype=torch.float32, lm_head="bf16")
    assert (dec(ids, 0, all_logits=True) - ref).abs().max() < 1e-4
    # the same logits when the tokens come one at a time after a prefill
    dec = Decoder(model, 64, kernel="reference", dtype=torch.float32, lm_head="bf16")
    steps = [dec(ids[:, :20], 0, all_logits=True)]
    steps += [dec(ids[:, t : t + 1], t, all_logits=True) for t in range(20, 40)]
    assert (torch.cat(steps) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", MODELS)
def test_fast_kernels_match_reference_path(arch):
    model = quantized(lambda: MODELS[arch]())
    ids = torch.randint(0, 320, (1, 30))
    fast = Decoder(model, 64, kernel="cpu")(ids, 0, all_logits=True)
    ref = Decoder(model, 64, kernel="reference", lm_head="int8")(ids, 0, all_logits=True)
    assert ((fast - ref).norm() / ref.norm()) < 2e-2


def test_unsupported_and_overlong():
    with pytest.raises(EdgequantError, match="no lean decoder"):
        Decoder(opt(), 64)
    dec = Decoder(llama(), 16)
    with pytest.raises(EdgequantError, match="longer than the cache"):
        dec(torch.zeros(1, 17, dtype=torch.long), 0)
    with pytest.raises(EdgequantError, match="does not fit"):
        generate(dec, list(range(16)), SamplingConfig())


def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, SamplingConfig(), None) == 1
    top1 = SamplingConfig(temperature=1.0, top_k=1)
    assert all(sample(logits, top1, torch.Generator().manual_seed(s)) == 1 for s in range(20))
    nucleus = SamplingConfig(temperature=1.0, top_p=0.5)  # token 1 alone holds > 0.5
    assert all(sample(logits, nucleus, torch.Generator().manual_seed(s)) == 1 for s in range(20))
    cfg = SamplingConfig(temperature=1.0)
    draws = {sample(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1, 2, 3}
    with pytest.raises(EdgequantError):
        SamplingConfig(top_p=0.0)


def test_seeded_sampling_repeats_and_stop_tokens_end():
    dec = Decoder(quantized(llama), 128)
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=50, seed=3)
    a = generate(dec, [1, 5, 9], cfg).tokens
    assert generate(dec, [1, 5, 9], cfg).tokens == a and len(a) == 20
    stop = generate(dec, [1, 5, 9], cfg, stop={a[4]})
    assert stop.stopped and stop.tokens == a[: a.index(a[4]) + 1]


def test_chat_turns_reuse_the_cache(tokenizer):
    model = quantized(llama)
    cfg = SamplingConfig(max_new_tokens=6)
    chat = Chat(Decoder(model, 256), tokenizer, cfg)
    pieces = []
    chat.turn("the model of the layer", pieces.append)
    second = chat.turn("and the scale of the group")
    assert "".join(pieces) == chat.messages[1]["content"]
    # a fresh decoder fed the whole transcript at once gives the same greedy reply
    fresh = Chat(Decoder(model, 256), tokenizer, cfg)
    fresh.messages = chat.messages[:3]
    again = generate(fresh.decoder, fresh.prompt_ids(), cfg, fresh.stop)
    assert again.tokens == second.tokens


@pytest.mark.skipif(not engine.cpu_supported(), reason="the C++ engine needs AVX512-BF16/VNNI")
@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("prompt", [20, 180])  # 180: attention split over threads, merged
def test_cpp_engine_is_as_close_to_exact_as_the_torch_kernels(arch, prompt):
    """Decode steps of the C++ engine and of the torch kernels, against float32 reference math."""
    model = quantized(lambda: MODELS[arch]())
    ids = torch.randint(0, 320, (1, prompt + 20))  # 20 decode steps pass gemma3's window of 16
    with_engine, torch_only = Decoder(model, 256), Decoder(model, 256, kernel="torch")
    exact = Decoder(model, 256, kernel="reference", dtype=torch.float32, lm_head="bf16")
    assert with_engine.engine is not None and torch_only.engine is None
    decoders = (with_engine, torch_only, exact)
    for dec in decoders:
        dec(ids[:, :prompt], 0)
    errs = []
    for t in range(prompt, prompt + 20):
        a, b, ref = (dec(ids[:, t : t + 1], t) for dec in decoders)
        errs.append([((x - ref).norm() / ref.norm()).item() for x in (a, b)])
    errs = torch.tensor(errs)  # [steps, (engine, torch)]
    assert errs[:, 0].max() < 3e-2  # bf16 activations, bf16 scales, int8 lm_head
    assert errs[:, 0].mean() <= 1.1 * errs[:, 1].mean()


@pytest.mark.skipif(not engine.cpu_supported(), reason="the C++ engine needs AVX512-BF16/VNNI")
@pytest.mark.parametrize("arch", MODELS)
def test_int4_lm_head_matches_its_reference(arch):
    """The 4-bit tied head: engine decode steps and embedding rows against float32 math."""
    model = quantized(lambda: MODELS[arch]())
    ids = torch.randint(0, 320, (1, 30))
    fast = Decoder(model, 64, lm_head="int4")
    exact = Decoder(model, 64, kernel="reference", dtype=torch.float32, lm_head="int4")
    assert fast.engine is not None
    assert torch.allclose(fast.vocab.embed(ids), exact.vocab.embed(ids), rtol=1e-5, atol=1e-6)
    for dec in (fast, exact):
        dec(ids[:, :20], 0)
    for t in range(20, 30):
        a, ref = (dec(ids[:, t : t + 1], t) for dec in (fast, exact))
        assert ((a - ref).norm() / ref.norm()) < 3e-2
