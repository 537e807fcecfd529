"""Decode and prefill speed: edgequant W4 vs HF transformers (fp32, bf16) vs llama.cpp Q4_0.

    python benchmarks/speed.py [--models smollm2-135m,gemma3-270m] [--threads 1,2] [--runs 3]

Every measurement runs in its own process (so peak RSS is its own), on the same 512-token
prompt, 128 greedy new tokens, medians of --runs after a warm-up:
  edgequant  `edgequant bench` on the W4 AWQ checkpoint (g64 SmolLM2, g128 Gemma), made here
             once and cached under $EDGEQUANT_CACHE/bench/; tied lm_head int8 (default) and
             4-bit g32 ("-head4", like the Q4_0 GGUF, whose token_embd is Q4_0 too)
  hf-fp32/bf16  transformers generate() on the float model (the dequantized GGUF weights)
  llama.cpp  llama-cpp-python (built from source once and cached, see ensure_llama_cpp) on a
             Q4_0 GGUF requantized with gguf-py from the model's own GGUF (the weights
             edgequant's float model comes from)
Writes benchmarks/results/speed.json and speed.md with tok/s and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgequant.bench import peak_rss_mb

RESULTS = Path(__file__).parent / "results"
GROUPS = {"smollm2-135m": 64, "gemma3-270m": 128}
PROMPT, NEW = 512, 128


def worker_hf(model: str, dtype: str, runs: int) -> dict:
    import torch

    from edgequant.bench import prompt_ids
    from edgequant.zoo import load

    m, tok = load(model)
    m = m.to(getattr(torch, dtype))
    ids = torch.tensor([prompt_ids(tok, PROMPT)])
    kw = {"do_sample": False, "pad_token_id": tok.eos_token_id}

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    with torch.inference_mode():
        timed(4)  # warm-up
        peak_rss_mb(reset=True)
        ttft = [timed(1) for _ in range(runs)]
        total = [timed(NEW) for _ in range(runs)]
    t1, tn = statistics.median(ttft), statistics.median(total)
    return {
        "prefill_tok_s": PROMPT / t1,
        "decode_tok_s": (NEW - 1) / (tn - t1),
        "ttft_s": t1,
        "peak_rss_mb": peak_rss_mb(),
        "model_bytes": sum(p.numel() * p.element_size() for p in m.parameters()),
    }


def worker_edgequant(path: str, lm_head: str, runs: int) -> dict:
    from edgequant.bench import bench, load_decoder

    dec, tok = load_decoder(path, PROMPT + NEW + 8, lm_head=lm_head)
    return bench(dec, tok, PROMPT, NEW, runs) | {"engine": dec.engine is not None}


def worker_llamacpp(gguf: str, threads: int, runs: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=PROMPT + NEW + 8, n_threads=threads, n_batch=PROMPT, verbose=False)
    text = " ".join(["Quantization maps the weights of a neural network onto integers."] * 60)
    ids = llm.tokenize(text.encode())[:PROMPT]

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        times = []
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter() - t0)
            if len(times) == NEW:
                break
        return times[0], times[-1]

    run()
    peak_rss_mb(reset=True)
    got = [run() for _ in range(runs)]
    t1 = statistics.median(g[0] for g in got)
    tn = statistics.median(g[1] for g in got)
    return {
        "prefill_tok_s": PROMPT / t1,
        "decode_tok_s": (NEW - 1) / (tn - t1),
        "ttft_s": t1,
        "peak_rss_mb": peak_rss_mb(),
        "model_bytes": os.path.getsize(gguf),
    }


def w4_checkpoint(model: str) -> Path:
    from edgequant.zoo import cache_dir

    out = cache_dir() / "bench" / f"{model}-awq-w4g{GROUPS[model]}"
    if not (out / "config.json").is_file():
        exe = Path(sys.executable).with_name("edgequant")
        cmd = [str(exe), "quantize", model, "--method", "awq", "--w-bits", "4"]
        cmd += ["--group-size", str(GROUPS[model]), "--out", str(out)]
        subprocess.run(cmd, check=True)
    return out


def q4_0_gguf(model: str) -> Path:
    """Requantize the model's own GGUF to Q4_0 with gguf-py (cached)."""
    from edgequant.zoo import SOURCES, cache_dir

    out = cache_dir() / "bench" / f"{model}-q4_0.gguf"
    if out.is_file():
        return out
    import tempfile

    import gguf

    from edgequant.zoo import _gguf_file

    with tempfile.TemporaryDirectory() as tmp:
        src = gguf.GGUFReader(_gguf_file(SOURCES[model], Path(tmp)))
        arch = src.fields["general.architecture"].contents()
        writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
        for name, field in src.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1])
        for t in src.tensors:
            data = gguf.dequantize(t.data, t.tensor_type)
            if len(t.shape) == 2 and data.shape[-1] % 32 == 0:
                q = gguf.quantize(data, gguf.GGMLQuantizationType.Q4_0)
                writer.add_tensor(t.name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            else:
                writer.add_tensor(t.name, data.astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    os.replace(str(out) + ".tmp", out)
    return out


def run_worker(args: list[str], threads: int, runs: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", *args, "--threads", str(threads)]
    cmd += ["--runs", str(runs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, threads: int, runs: int) -> dict:
    ckpt = str(w4_checkpoint(model))
    rows = {"edgequant-w4": run_worker(["edgequant", ckpt, "int8"], threads, runs)}
    rows["edgequant-w4-head4"] = run_worker(["edgequant", ckpt, "int4"], threads, runs)
    for dtype in ("float32", "bfloat16"):
        rows[f"hf-{dtype}"] = run_worker(["hf", model, dtype], threads, runs)
    if ensure_llama_cpp():
        gguf = str(q4_0_gguf(model))
        rows["llama.cpp-q4_0"] = run_worker(["llamacpp", gguf], threads, runs)
    else:
        rows["llama.cpp-q4_0"] = {"error": "llama-cpp-python could not be built"}
    return rows


def ensure_llama_cpp() -> bool:
    """Import llama-cpp-python, building it from PyPI's source once (about 15 minutes on 2
    cores, for this CPU: GGML_NATIVE) into a wheel cached under $EDGEQUANT_CACHE/wheels."""
    try:
        import llama_cpp  # noqa: F401

        return True
    except ImportError:
        pass
    from edgequant.zoo import cache_dir

    wheels = cache_dir() / "wheels"
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        print("building llama-cpp-python (once, cached in", wheels, ")", file=sys.stderr)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF"}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels)]
        if subprocess.run([*cmd, "llama-cpp-python>=0.3"], env=env).returncode:
            return False
    wheel = sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]
    if subprocess.run([*pip, str(wheel)]).returncode:  # pulls its small pure-Python deps
        return False
    import importlib

    importlib.invalidate_caches()
    return importlib.util.find_spec("llama_cpp") is not None


def render(results: dict) -> str:
    out = ["# Speed: tokens per second (medians)", "", results["protocol"], ""]
    out += [
        "| model | threads | runtime | prefill tok/s | decode tok/s | TTFT (s) | "
        "peak RSS (MB) | model MB | decode vs hf-fp32 | decode vs llama.cpp |"
    ]
    out += ["|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in results["rows"].items():
        model, threads = key.split("|")
        base = rows.get("hf-float32", {}).get("decode_tok_s")
        lcpp = rows.get("llama.cpp-q4_0", {}).get("decode_tok_s")
        for name, r in rows.items():
            if "error" in r:
                out.append(f"| {model} | {threads} | {name} | {r['error']} |||||||")
                continue
            d = r["decode_tok_s"]
            cells = [
                f"{r['prefill_tok_s']:.1f}",
                f"{d:.1f}",
                f"{r['ttft_s']:.3f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['model_bytes'] / 1e6:.1f}",
                f"{d / base:.2f}x" if base else "-",
                f"{d / lcpp:.2f}x" if lcpp else "-",
            ]
            out.append(f"| {model} | {threads} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(GROUPS))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(int(a.threads))
        kind, *rest = a.worker
        fn = {"hf": worker_hf, "edgequant": worker_edgequant}.get(kind)
        res = fn(*rest, a.runs) if fn else worker_llamacpp(rest[0], int(a.threads), a.runs)
        print(json.dumps(res))
        return
    from edgequant.io import atomic_write_text

    results = json.loads(a.out.read_text()) if a.out.is_file() else {"rows": {}}
    results["protocol"] = (
        f"{PROMPT}-token prompt, {NEW} greedy new tokens; prefill tok/s = prompt / time to "
        "first token; decode tok/s over the remaining tokens; each runtime in its own process; "
        f"peak RSS = VmHWM reset after loading; {os.cpu_count()} cores."
    )
    for model in a.models.split(","):
        for t in (int(x) for x in a.threads.split(",")):
            results["rows"][f"{model}|{t}"] = measure(model, t, a.runs)
            atomic_write_text(a.out, json.dumps(results, indent=2) + "\n")
            atomic_write_text(a.out.with_suffix(".md"), render(results))
    print(render(results))


if __name__ == "__main__":
    main()
