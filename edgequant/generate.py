"""The decode loop: prefill, sample, stream; greedy or temperature / top-k / top-p sampling."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgequant.decoder import Decoder
from edgequant.errors import EdgequantError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EdgequantError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise EdgequantError("need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


def sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    # logits [V] float32 -> token id
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prefill_s: float = 0.0  # the prompt's forward, ending with the first token's logits
    decode_s: float = 0.0  # every later forward
    stopped: bool = False  # ended on a stop token (not on the length limit)

    @property
    def decode_tok_s(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0


def generate(
    decoder: Decoder,
    prompt: list[int],
    cfg: SamplingConfig,
    stop: set[int] = frozenset(),
    pos: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Append `prompt` at position `pos` of the decoder's cache, then generate after it."""
    if not prompt:
        raise EdgequantError("the prompt is empty")
    budget = decoder.max_seq - pos - len(prompt)
    if budget < 1:
        raise EdgequantError(f"prompt does not fit the context ({decoder.max_seq} tokens)")
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    out = Generation(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    logits = decoder(torch.tensor([prompt]), pos)
    pos += len(prompt)
    for step in range(min(cfg.max_new_tokens, budget)):
        tok = sample(logits, cfg, gen)
        now = time.perf_counter()
        if step == 0:
            out.prefill_s = now - t0
        out.tokens.append(tok)
        if on_token:
            on_token(tok)
        if tok in stop:
            out.stopped = True
            break
        if step + 1 == min(cfg.max_new_tokens, budget):
            break
        t1 = time.perf_counter()
        logits = decoder(torch.tensor([[tok]]), pos)
        pos += 1
        out.decode_s += time.perf_counter() - t1
    return out


class TextStream:
    """Turns token ids into printable text pieces as they come (multi-byte safe)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more
            return ""
        piece, self.printed = text[len(self.printed) :], text
        return piece


def stop_tokens(tokenizer, model_config) -> set[int]:
    """EOS ids from the tokenizer and the model's generation settings."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(model_config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids if i is not None}


class Chat:
    """A multi-turn conversation on one KV cache: each turn prefills only the new tokens."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer,
        cfg: SamplingConfig,
        system: str | None = None,
        template: bool = True,
    ):
        """template False: no chat format, the turns' texts are one continued document."""
        self.decoder, self.tok, self.cfg, self.template = decoder, tokenizer, cfg, template
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cached: list[int] = []  # tokens whose k/v are in the cache, in order
        self.stop = stop_tokens(tokenizer, decoder.config)

    def prompt_ids(self) -> list[int]:
        if self.template and self.tok.chat_template:
            ids = self.tok.apply_chat_template(
                self.messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)
        if self.template:  # a model without a chat template: a plain transcript
            text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"
        else:
            text = "".join(m["content"] for m in self.messages)
        return self.tok(text)["input_ids"]

    def turn(self, user: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer `user`, streaming the reply's text pieces to on_text as they come."""
        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        keep = 0  # reuse the cached prefix; at least one token is always fed
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        stream = TextStream(self.tok)

        def emit(token: int) -> None:
            piece = stream.push(token)
            if on_text and piece:
                on_text(piece)

        out = generate(self.decoder, ids[keep:], self.cfg, self.stop, keep, emit)
        self.cached = ids + out.tokens[:-1]  # the last sampled token was never fed
        reply = self.tok.decode(out.tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})
        return out
