"""Prefill deep into the context on the CPU, with the attention of long chunks
split over two cores (engine/attention.py) and without.

    .venv/bin/python bench/bench_attention.py [--depth 12288] [--record]

Reads ``depth`` + 256 random tokens into a fresh prompt cache of the embedded
SmolLM2 (float32, OpenBLAS, served at 32k as by default) in the engine's CPU
chunks of 256, once with the model's own attention and once split; prints the
seconds of chunks at a few depths, the total, and how far the last chunk's
logits moved (float rounding only: the split computes the same numbers).
"""

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import publish  # noqa: E402
from engine.models import use_openblas  # noqa: E402

use_openblas()  # before MLX is imported, as the server does
from engine import attention  # noqa: E402
from engine.engine import PREFILL_CHUNK_CPU  # noqa: E402
from engine.models import embedded_gguf, imported_dir, load  # noqa: E402


def prefill(model, tokens):
    """Seconds per chunk, and the last chunk's logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    seconds = []
    for start in range(0, len(tokens), PREFILL_CHUNK_CPU):
        began = time.perf_counter()
        logits = model(mx.array(tokens[start:start + PREFILL_CHUNK_CPU])[None], cache=cache)
        mx.eval(logits, [c.state for c in cache])
        seconds.append(time.perf_counter() - began)
    return seconds, logits[0, -1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12288)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    import mlx.core as mx

    loaded = load(str(imported_dir(embedded_gguf())), context_window=32768)
    module = sys.modules[type(loaded.model).__module__]
    split = module.scaled_dot_product_attention
    own = getattr(split, "splits", split)
    mx.random.seed(0)
    tokens = mx.random.randint(0, 49000, (args.depth + PREFILL_CHUNK_CPU,)).tolist()
    runs = {}
    for name, function in (("the model's own", own), ("split over 2 cores", split)):
        module.scaled_dot_product_attention = function
        runs[name] = prefill(loaded.model, tokens)
        print(name, f"{sum(runs[name][0]):.1f} s", flush=True)
    marks = sorted({0, len(tokens) // PREFILL_CHUNK_CPU // 2, len(tokens) // PREFILL_CHUNK_CPU - 1})
    head = " | ".join(f"chunk at {i * PREFILL_CHUNK_CPU} (s)" for i in marks)
    rows = [f"| {name} | " + " | ".join(f"{seconds[i]:.2f}" for i in marks)
            + f" | {sum(seconds):.1f} | {len(tokens) / sum(seconds):.1f} |"
            for name, (seconds, _) in runs.items()]
    (own_s, own_logits), (split_s, split_logits) = runs.values()
    moved = mx.abs(own_logits - split_logits).max().item()
    publish(f"## CPU prefill deep into the context, attention split over two cores "
            f"({date.today()})\n\n"
            f"`python bench/bench_attention.py --depth {args.depth} --record`; "
            f"{platform.machine()}, {os.cpu_count()} cores ({attention.cores()} usable), "
            f"CPU backend, {loaded.weights}, SmolLM2-135M at 32768 tokens, "
            f"{len(tokens)} random tokens in chunks of {PREFILL_CHUNK_CPU}.\n\n"
            f"| attention | {head} | total (s) | tok/s |\n"
            f"|---|{'---|' * len(marks)}---|---|\n" + "\n".join(rows) + "\n\n"
            f"- the split: {sum(own_s) / sum(split_s):.2f}x the whole prefill, "
            f"{own_s[-1] / split_s[-1]:.2f}x its last chunk; the last chunk's logits "
            f"moved by at most {moved:.1e} (float rounding)", args.record)


if __name__ == "__main__":
    main()
