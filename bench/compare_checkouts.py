"""The decode and serving benches of two checkouts, run in alternation.

    .venv/bin/python bench/compare_checkouts.py BEFORE_DIR [--after DIR] [--pairs 5]

A change that should not move performance (a refactor) is checked by running
``bench/bench_decode.py`` and ``bench/bench_serving.py --concurrency 1,4``
of each checkout (a ``git worktree`` of the old commit, say) in turn, pair
after pair, the order flipped each pair, so a noisy machine slows both
alike. Each checkout runs its own scripts and its own ``pensieve.py`` with
this interpreter. Prints every run's figures as a JSON line, then the
medians and their ratio, after over before.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {
    "decode": ["bench/bench_decode.py", "--tokens", "64", "--runs", "3"],
    "serving": ["bench/bench_serving.py", "--tokens", "32", "--runs", "2", "--rounds", "1",
                "--concurrency", "1,4"],
}
# What each bench's report says, as (figure, pattern, group): a number in
# the markdown table it prints.
FIGURES = {
    "decode": [
        ("http_tps", r"\| HTTP \(pensieve\), seen by the client \| ([\d.]+) \|", 1),
        ("http_ttft_ms", r"\| HTTP \(pensieve\), seen by the client \| [\d.]+ \| ([\d.]+) \|",
         1),
        ("inproc_tps", r"\| in-process mlx-lm \| ([\d.]+) \|", 1),
        ("added_ttft_ms", r"median \*\*([\d.]+) ms\*\*", 1),
    ],
    "serving": [
        ("single_tps", r"\| pensieve \(HTTP\) \| ([\d.]+) \|", 1),
        ("single_ttft_ms", r"\| pensieve \(HTTP\) \| [\d.]+ \| ([\d.]+) \|", 1),
        *[(f"{what}{n}", rf"\| {n} \| pensieve \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", group)
          for n in (1, 4)
          for what, group in (("agg_tps_", 1), ("per_stream_tps_", 2), ("ttft_p50_ms_", 3))],
    ],
}


def figures(bench, report):
    out = {}
    for name, pattern, group in FIGURES[bench]:
        match = re.search(pattern, report)
        if match is None:
            raise SystemExit(f"{bench}: no {name} in its report:\n{report[-2000:]}")
        out[name] = float(match[group])
    return out


def run(bench, checkout):
    started = time.time()
    proc = subprocess.run([sys.executable, *BENCHES[bench]], cwd=checkout,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{bench} in {checkout} failed:\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return figures(bench, proc.stdout), time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="the checkout to compare against")
    parser.add_argument("--after", default=str(ROOT), help="default: this checkout")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--benches", default="decode,serving")
    args = parser.parse_args()
    sides = {"before": args.before, "after": args.after}
    benches = args.benches.split(",")
    results = {b: {"before": [], "after": []} for b in benches}
    for pair in range(args.pairs):
        for bench in benches:
            order = ("before", "after") if pair % 2 == 0 else ("after", "before")
            for side in order:
                figs, seconds = run(bench, sides[side])
                results[bench][side].append(figs)
                print(json.dumps({"pair": pair, "bench": bench, "side": side,
                                  "s": round(seconds), **figs}), flush=True)
    for bench in benches:
        for name in results[bench]["before"][0]:
            before = statistics.median(r[name] for r in results[bench]["before"])
            after = statistics.median(r[name] for r in results[bench]["after"])
            print(f"{bench} {name}: before {before:g}, after {after:g}, "
                  f"after/before {after / before:.3f}")


if __name__ == "__main__":
    main()
