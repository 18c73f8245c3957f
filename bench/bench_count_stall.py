"""How long a big count_tokens stops a running generation's decoding.

    .venv/bin/python bench/bench_count_stall.py [--mb 4] [--record]

In-process, on the real Engine (no HTTP, so the event loop's JSON parsing
is not measured here: bench/bench_loop_stall.py does that): a 2-layer
random-weight llama with SmolLM2's real tokenizer and template (the test
suite's tiny model, with a 32k window) streams a long greedy answer; once
it decodes, a CountRequest of one user message of ``--mb`` MB of prose is
submitted. Reported: the generation's median gap between two delivered
text pieces before the count, the longest gap while the count was being
tokenized (submitted -> Counted), and how long the count took. Before the
prompt thread (engine/prompts.py) the count ran on the engine thread, so
the longest gap was the whole count; after, it should stay near one step.
--record appends the table to bench/RESULTS.md.
"""

import argparse
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from engine.models import use_openblas  # noqa: E402

use_openblas()  # before MLX is imported

from engine import CountRequest, Counted, Engine, GenerationRequest, TextDelta  # noqa: E402
from engine.models import embedded_gguf, imported_dir  # noqa: E402
from helpers import write_tiny_llama  # noqa: E402

WINDOW = 32768
WORDS = "the quick brown fox jumps over the lazy dog while 12 cats watch, "


def tiny_model(out):
    smollm = imported_dir(embedded_gguf())
    write_tiny_llama(out, window=WINDOW)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm / name, out / name)
    return out


def measure(engine, mb):
    """(median gap before, longest gap during the count, count seconds, tokens)."""
    stamps, counted = [], queue.Queue()
    started = threading.Event()

    def on_generation(msg):
        if isinstance(msg, TextDelta):
            stamps.append(time.perf_counter())
            if len(stamps) == 50:
                started.set()

    job = engine.submit(GenerationRequest(messages=(("user", "Tell a story."),),
                                          max_tokens=WINDOW // 2, temperature=0.0),
                        on_generation)
    try:
        if not started.wait(120):
            raise RuntimeError("the generation did not start decoding")
        # Its own first word each run: a text seen before is not tokenized again.
        text = f"{time.time()} " + (WORDS * (mb * 1_000_000 // len(WORDS) + 1))[:mb * 1_000_000]
        sent = time.perf_counter()
        engine.submit(CountRequest(messages=(("user", text),)), counted.put)
        answer = counted.get(timeout=600)
        done = time.perf_counter()
        assert isinstance(answer, Counted), answer
        deadline = time.monotonic() + 60  # the first piece after the count
        while stamps[-1] <= done and time.monotonic() < deadline:
            time.sleep(0.01)
        before = [b - a for a, b in zip(stamps, stamps[1:]) if b < sent]
        # Gaps that overlap the count: from the last piece before it was sent
        # to the first after it was answered.
        times = [t for t in stamps if t <= done] + [t for t in stamps if t > done][:1]
        during = [b - a for a, b in zip(times, times[1:]) if b > sent]
        return (statistics.median(before), max(during, default=done - sent), done - sent,
                answer.input_tokens, len(during))
    finally:
        job.cancel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(str(tiny_model(Path(tmp))), cpu_weights="stored")
        engine.start()
        engine.wait_loaded(300)
        rows = []
        try:
            for run in range(args.runs):
                step, gap, took, tokens, pieces = measure(engine, args.mb)
                rows.append(f"| {run + 1} | {args.mb} | {tokens} | {took:.2f} | "
                            f"{step * 1000:.1f} | {gap * 1000:.1f} | {pieces} |")
                print(rows[-1], flush=True)
        finally:
            engine.stop(10)
    table = "\n".join([
        "| run | count body, MB | counted tokens | count took, s | decode step before, "
        "median ms | longest gap during the count, ms | pieces decoded during it |",
        "|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n\n### bench_count_stall ({stamp}, {platform.machine()}, "
                    f"{date.today()})\n\n`bench/bench_count_stall.py --mb {args.mb}`\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
