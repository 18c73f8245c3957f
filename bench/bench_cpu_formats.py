"""Which weight format and BLAS make the CPU backend fastest, and stay correct.

    .venv/bin/python bench/bench_cpu_formats.py [--model M] [--record]

Each variant runs in its own process (the BLAS is chosen before MLX loads):
  stored              the model as stored (4-bit for the embedded model), bundled BLAS
  f32/reference-blas  dequantized to float32, MLX's bundled reference BLAS
  f32/openblas-N      dequantized to float32, system OpenBLAS with N threads
  f16, bf16           dequantized to half precision, OpenBLAS loaded
For each: prefill tok/s on a ~500-token chat prompt (time to the first token),
decode tok/s over the next 32 tokens, greedy, after one warm-up, median of 2;
and the greedy answer to "What is the capital of France?" as a correctness check.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "stored": {"weights": "stored", "blas": "reference"},
    "f32/reference-blas": {"weights": "float32", "blas": "reference"},
    "f32/openblas-1": {"weights": "float32", "blas": "openblas", "threads": "1"},
    "f32/openblas-2": {"weights": "float32", "blas": "openblas", "threads": "2"},
    "f16/openblas-2": {"weights": "float16", "blas": "openblas", "threads": "2"},
    "bf16/openblas-2": {"weights": "bfloat16", "blas": "openblas", "threads": "2"},
}
DECODE_TOKENS = 32
TEXT = ("The history of computing spans mechanical calculators, vacuum tubes, "
        "transistors and integrated circuits, each step making machines smaller, "
        "faster and cheaper. ")


def measure(spec, variant):
    """Run in the child process: load one way, time prefill and decode."""
    if variant["blas"] == "reference":
        import mlx.core  # noqa: F401  imported first: engine.models then skips OpenBLAS
    from engine.models import load

    loaded = load(spec, cpu_weights="stored" if variant["weights"] == "stored"
                  else "float32")
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    if variant["weights"] in ("float16", "bfloat16"):
        loaded.model.set_dtype(getattr(mx, variant["weights"]))
    tok = loaded.tokenizer

    def chat(content):
        return tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True,
            tokenize=False), add_special_tokens=False)

    prompt = mx.array(chat(TEXT * 18 + "\nSummarize the text above."))
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        steps = generate_step(prompt, loaded.model, max_tokens=DECODE_TOKENS + 1)
        next(steps)
        first = time.perf_counter()
        n = sum(1 for _ in steps)
        end = time.perf_counter()
        runs.append({"prefill": len(prompt) / (first - start), "decode": n / (end - first)})
    answer = [t for t, _ in generate_step(mx.array(chat("What is the capital of France?")),
                                          loaded.model, max_tokens=12)]
    end = answer.index(tok.eos_token_id) if tok.eos_token_id in answer else len(answer)
    return {"prompt": len(prompt), "weights": loaded.weights,
            "prefill": statistics.median(r["prefill"] for r in runs[1:]),
            "decode": statistics.median(r["decode"] for r in runs[1:]),
            "answer": tok.decode(answer[:end])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, VARIANTS[args.child])))
        return

    rows = []
    for name, variant in VARIANTS.items():
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if "threads" in variant:
            env["OPENBLAS_NUM_THREADS"] = variant["threads"]
        cmd = [sys.executable, __file__, "--child", name] + (
            ["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, result))
        print(name, result, flush=True)
    lines = [f"### {date.today()} — CPU weight formats, {platform.machine()} "
             f"{os.cpu_count()} cores",
             "",
             f"`{' '.join(['bench/bench_cpu_formats.py'] + sys.argv[1:])}` — prompt "
             f"{rows[0][1]['prompt']} tokens, {DECODE_TOKENS} decoded, greedy, "
             "median of 2 after a warm-up",
             "",
             "| variant | prefill tok/s | decode tok/s | answer |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['prefill']:.1f} | {r['decode']:.1f} | {r['answer']!r} |"
              for name, r in rows]
    lines.append("")
    from common import publish  # beside this script

    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
