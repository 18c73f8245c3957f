"""Fair prefill: how long a short request waits behind a full-window prompt.

    .venv/bin/python bench/bench_fair_prefill.py [--model M] [--context-window 8192]
        [--points 0.2,0.5,0.8] [--checkout DIR] [--record]

Through `python pensieve.py` (this checkout's, or --checkout DIR's, to
measure another tree the same way), streaming, greedy:
1. a short request alone (~30 prompt tokens): its time to first token, the
   median of 3 after a warm-up;
2. a full-window prompt alone (the window less 64 tokens, a distinct first
   line each time so no prompt cache serves it): its time to first token, T;
3. for each point p: the full-window prompt sent, and p * T later the short
   request: the short one's time to first token (its wait) and the long
   one's. The worst wait is the largest over the points.
The engine steps one chunk of a prompt at a time (256 tokens on a CPU): the
short request's wait over the time of a chunk shows how many chunks of the
long prompt it waited for.
--record appends the table to bench/RESULTS.md.
"""

import argparse
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import KEY, free_port, publish, stream, wait_ready  # noqa: E402

SHORT = "Say hello."


def start(checkout, spec, window, log):
    port = free_port()
    args = [sys.executable, str(checkout / "pensieve.py"), "--port", str(port),
            "--api-key", KEY, "--context-window", str(window),
            *(["--model", spec] if spec else [])]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=checkout)
    wait_ready(proc, port, "/health", log)
    return proc, port


def count(port, text):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/messages/count_tokens", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": text}]}),
        {"x-api-key": KEY, "content-type": "application/json"})
    tokens = json.loads(conn.getresponse().read())["input_tokens"]
    conn.close()
    return tokens


def long_prompt(port, tokens):
    """A prompt of about ``tokens`` tokens, new every call (its first line)."""
    body = " ".join(f"item{i}" for i in range(tokens // 3))
    head = f"Run {secrets.token_hex(4)}.\n"
    while count(port, head + body) > tokens:
        body = body[: int(len(body) * 0.97)]
    return head + body


def ask(port, text, max_tokens):
    ttft, _, _ = stream(port, {"model": "m", "max_tokens": max_tokens, "stream": True,
                               "temperature": 0.0,
                               "messages": [{"role": "user", "content": text}]})
    return ttft


def behind(port, window, delay):
    """(short wait, long TTFT): the short request sent ``delay`` s after a
    full-window prompt."""
    prompt = long_prompt(port, window - 64)
    result = {}
    reader = threading.Thread(target=lambda: result.update(long=ask(port, prompt, 1)))
    reader.start()
    time.sleep(delay)
    result["short"] = ask(port, SHORT + f" ({secrets.token_hex(2)})", 4)
    reader.join()
    return result["short"], result["long"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--context-window", type=int, default=8192)
    parser.add_argument("--points", default="0.2,0.5,0.8")
    parser.add_argument("--checkout", type=Path, default=ROOT)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    points = [float(p) for p in args.points.split(",")]
    window = args.context_window
    with tempfile.NamedTemporaryFile("w", prefix="fair-prefill-", suffix=".log",
                                     delete=False) as log:
        proc, port = start(args.checkout.resolve(), args.model, window, log)
        try:
            ask(port, SHORT, 4)  # warm-up
            alone = statistics.median(ask(port, SHORT + f" ({i})", 4) for i in range(3))
            full = ask(port, long_prompt(port, window - 64), 1)
            rows = [(p, *behind(port, window, p * full)) for p in points]
        finally:
            proc.terminate()
            proc.wait(60)
    chunk_s = full / ((window - 64) / 256)
    lines = [f"### {date.today()} — fair prefill, {platform.machine()} "
             f"{__import__('os').cpu_count()} cores, checkout {args.checkout.name}",
             "",
             f"`bench/bench_fair_prefill.py --context-window {window} --points "
             f"{args.points}{' --checkout ' + str(args.checkout) if args.checkout != ROOT else ''}`"
             f" — a {window - 64}-token prompt read in {full:.1f} s alone "
             f"(~{chunk_s:.2f} s a 256-token chunk on average); the short request alone: "
             f"{alone * 1000:.0f} ms to its first token",
             "",
             "| short sent after | short's wait (TTFT) | in average chunks | long's TTFT |",
             "|---|---|---|---|"]
    for p, short, long in rows:
        lines.append(f"| {p:.0%} of T ({p * full:.1f} s) | {short:.2f} s | "
                     f"{short / chunk_s:.1f} | {long:.1f} s |")
    worst = max(short for _, short, _ in rows)
    lines += ["", f"Worst wait: {worst:.2f} s ({worst / chunk_s:.1f} average chunks)."]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
