"""Memory with the prompt cache full: does the server stay within its bound?

    .venv/bin/python bench/bench_memory.py [--model M] [--cache-mb 256]
        [--prompts 8] [--prompt-words 400] [--record] [-- PENSIEVE_OPTIONS...]

Starts `python pensieve.py --prompt-cache-mb CACHE_MB`, then sends --prompts
distinct long prompts, one after another, each leaving its KV cache behind:
together they offer the cache several times its bound. After each request:
the prompt cache's bytes and entries (/health), MLX's active and peak memory,
and the server's resident set (RSS, /proc). The claim checked: the cache
never exceeds its bound, and memory beyond the loaded model grows by no more
than the bound plus one request's working set.
"""

import argparse
import os
import platform
import secrets
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import get_json, proc_memory, publish, start_server, stop_server, stream  # noqa: E402

MB = 1024 * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cache-mb", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=400)
    parser.add_argument("--record", action="store_true")
    parser.add_argument("server_args", nargs="*", help="more pensieve.py options")
    args = parser.parse_args()

    log = open(os.devnull, "w")
    proc, port = start_server(args.model, log,
                              ["--prompt-cache-mb", str(args.cache_mb), *args.server_args])
    rows = []
    try:
        health = get_json(port, "/health")
        base = (proc_memory(proc.pid, "VmRSS"), health.get("memory_active_bytes", 0))
        for i in range(1, args.prompts + 1):
            words = " ".join(secrets.token_hex(3) for _ in range(args.prompt_words))
            body = {"model": "bench", "max_tokens": 8, "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Sort these: {words}"}]}
            _, _, usage = stream(port, body)
            health = get_json(port, "/health")
            rows.append((i, usage["input_tokens"], health["prompt_cache_entries"],
                         health["prompt_cache_bytes"], health.get("memory_active_bytes", 0),
                         health.get("memory_peak_bytes", 0), proc_memory(proc.pid, "VmRSS")))
            print(rows[-1], flush=True)
        peak = proc_memory(proc.pid)
        bound = health["prompt_cache_max_bytes"]
        device, model = health["device"], health["model"]
    finally:
        stop_server(proc, log)

    lines = [f"### {date.today()} — memory, {model}, {platform.machine()} "
             f"{os.cpu_count()} cores, {device}", "",
             f"`{' '.join(['bench/bench_memory.py'] + sys.argv[1:])}` — distinct prompts "
             "one after another, each leaving its KV cache in the prompt cache", "",
             f"After loading: RSS {base[0] / MB:.0f} MiB, MLX active {base[1] / MB:.0f} "
             f"MiB; cache bound {bound / MB:.0f} MiB.", "",
             "| request | prompt tokens | cache entries | cache MiB | MLX active MiB "
             "| MLX peak MiB | RSS MiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {n} | {e} | {c / MB:.0f} | {a / MB:.0f} | {p / MB:.0f} | "
              f"{r / MB:.0f} |" for i, n, e, c, a, p, r in rows]
    offered = sum(r[1] for r in rows)
    lines += ["", f"- {offered} prompt tokens offered; cache at most "
              f"**{max(r[3] for r in rows) / MB:.0f} MiB** of its {bound / MB:.0f} MiB bound",
              f"- growth over the loaded model: MLX active at most "
              f"**{(max(r[4] for r in rows) - base[1]) / MB:.0f} MiB**, MLX peak "
              f"{(max(r[5] for r in rows) - base[1]) / MB:.0f} MiB, RSS at most "
              f"{(max(r[6] for r in rows) - base[0]) / MB:.0f} MiB (peak RSS "
              f"{peak / MB:.0f} MiB)", ""]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
