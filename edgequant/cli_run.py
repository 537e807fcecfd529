"""`edgequant generate | chat | bench`: run a (quantized) model with the lean decoder."""

from __future__ import annotations

import sys


def _add_run(sub) -> None:
    helps = {
        "generate": "generate text from a prompt (streams tokens)",
        "chat": "interactive multi-turn chat (streams tokens, shows tok/s)",
        "bench": "prefill / decode speed, time to first token, peak memory",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="quantized checkpoint directory, model directory or zoo name")
        p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
        p.add_argument(
            "--kernel",
            choices=("cpu", "torch", "reference"),
            default="cpu",
            help="cpu: the C++ engine where it builds, else torch's fused ops; torch: only "
            "torch's ops; reference: dequantize + matmul (slow, the oracle)",
        )
        p.add_argument(
            "--lm-head",
            choices=("int8", "int4", "bf16"),
            default="int8",
            help="tied embedding / lm_head: per-row int8, 4-bit g32 (C++ engine only) or bf16",
        )
        p.add_argument("--max-seq", type=int, default=2048, help="KV cache length")
        if name == "bench":
            p.add_argument("--prompt-tokens", type=int, default=512)
            p.add_argument("--new-tokens", type=int, default=128)
            p.add_argument("--runs", type=int, default=3)
            p.add_argument("--json", metavar="FILE")
            continue
        if name == "generate":
            p.add_argument("--prompt", required=True)
            p.add_argument("--template", action="store_true", help="wrap in the chat template")
        else:
            p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256 if name == "chat" else 128)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int)


def _decoder(a):
    import torch

    from edgequant.bench import load_decoder
    from edgequant.generate import SamplingConfig

    if a.threads:
        torch.set_num_threads(a.threads)
    sampling = None
    if a.command != "bench":
        sampling = SamplingConfig(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    dec, tok = load_decoder(a.model, a.max_seq, a.kernel, a.lm_head)
    return dec, tok, sampling


def _speed(out) -> str:
    return (
        f"[{out.prompt_tokens} prompt tokens at {out.prefill_tok_s:.1f} tok/s, "
        f"{len(out.tokens)} new at {out.decode_tok_s:.1f} tok/s]"
    )


def cmd_generate(a) -> dict:
    from edgequant.generate import Chat

    dec, tok, sampling = _decoder(a)
    chat = Chat(dec, tok, sampling, template=a.template)
    out = chat.turn(a.prompt, on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(_speed(out), file=sys.stderr)
    return {"text": chat.messages[-1]["content"], "tokens": out.tokens}


def cmd_chat(a) -> dict:
    from edgequant.generate import Chat

    dec, tok, sampling = _decoder(a)
    chat = Chat(dec, tok, sampling, system=a.system)
    print("edgequant chat: an empty line or Ctrl-D ends the conversation", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        out = chat.turn(user, on_text=lambda piece: print(piece, end="", flush=True))
        print(f"\n{_speed(out)}", flush=True)
    return {"turns": len(chat.messages) // 2}


def cmd_bench(a) -> dict:
    from edgequant.bench import bench

    dec, tok, _ = _decoder(a)
    res = {"model": a.model, "kernel": a.kernel, "lm_head": a.lm_head}
    res |= bench(dec, tok, a.prompt_tokens, a.new_tokens, a.runs)
    print("| " + " | ".join(res) + " |\n|" + "---|" * len(res))
    print(
        "| "
        + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in res.values())
        + " |"
    )
    if a.json:
        from edgequant.cli import _write_json

        _write_json(a.json, res)
    return res
