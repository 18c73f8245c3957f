"""Decode speed and time to first token: through Pensieve's HTTP API and in-process.

    .venv/bin/python bench/bench_decode.py [--model M] [--tokens 128] [--runs 3] [--record]

One run measures, for the same model, prompt and greedy decoding:
  in-process  mlx-lm's stream_generate on the model as the server loads it
              (engine.models.load: same weights format, same BLAS);
  http        `python pensieve.py` in a subprocess, one streaming request over
              a real socket: TTFT = request sent -> first text delta; decode
              tok/s = (output tokens - 1) / (last delta - first delta).
The server's own log line gives its engine-side TTFT, so the difference with
the HTTP TTFT is what the HTTP layer adds. Warm-up runs come first; medians are
reported. --record appends the table to bench/RESULTS.md.
"""

import argparse
import http.client
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a long, detailed story about a dragon who learns to write software."
KEY = "bench-key"


def in_process(spec, tokens, runs):
    from engine.models import load

    loaded = load(spec)  # loads OpenBLAS before MLX, dequantizes on CPU
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tok = loaded.tokenizer
    results = []
    for i in range(runs + 1):
        start = time.perf_counter()
        prompt = tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True,
            tokenize=False), add_special_tokens=False)
        first = last = None
        n = 0
        for r in stream_generate(loaded.model, tok, prompt, max_tokens=tokens,
                                 sampler=make_sampler(temp=0.0)):
            last = time.perf_counter()
            first = first or last
            n = r.generation_tokens
        if i:  # run 0 is the warm-up
            results.append({"ttft": first - start, "tps": (n - 1) / (last - first),
                            "tokens": n, "prompt": len(prompt)})
    return loaded, results


def stream_once(port, tokens):
    body = json.dumps({"model": "bench", "max_tokens": tokens, "stream": True,
                       "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/messages", body, {"x-api-key": KEY,
                                                 "content-type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    output_tokens = None
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = json.loads(line[6:])
        if data["type"] == "content_block_delta":
            last = time.perf_counter()
            first = first or last
        elif data["type"] == "message_delta":
            output_tokens = data["usage"]["output_tokens"]
    conn.close()
    return {"ttft": first - start, "tps": (output_tokens - 1) / (last - first),
            "tokens": output_tokens}


def over_http(spec, tokens, runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    args = [sys.executable, str(ROOT / "pensieve.py"), "--port", str(port),
            "--api-key", KEY] + (["--model", spec] if spec else [])
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server did not start; see {log.name}")
                time.sleep(0.2)
        results = [stream_once(port, tokens) for _ in range(runs + 1)][1:]
    finally:
        proc.terminate()
        proc.wait(30)
    engine_ttfts = [float(m) / 1000 for m in
                    re.findall(r"engine ttft ([\d.]+) ms", Path(log.name).read_text())]
    for r, e in zip(results, engine_ttfts[1:]):
        r["engine_ttft"] = e
    os.unlink(log.name)
    return results


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="as pensieve.py --model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    loaded, local = in_process(args.model, args.tokens, args.runs)
    served = over_http(args.model, args.tokens, args.runs)
    ratio = median(served, "tps") / median(local, "tps")
    added_ms = (median(served, "ttft") - median(served, "engine_ttft")) * 1000
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {loaded.device}, "
               f"{loaded.weights}")
    rows = [
        ("in-process mlx-lm", median(local, "tps"), median(local, "ttft") * 1000),
        ("HTTP (pensieve)", median(served, "tps"), median(served, "ttft") * 1000),
    ]
    table = [f"### {date.today()} — {loaded.name}, {machine}",
             "",
             f"`{' '.join(['bench/bench_decode.py'] + sys.argv[1:])}` — prompt "
             f"{local[0]['prompt']} tokens, {median(served, 'tokens'):.0f} output tokens, "
             f"greedy, median of {args.runs} after a warm-up",
             "",
             "| path | decode tok/s | TTFT ms |", "|---|---|---|"]
    table += [f"| {name} | {tps:.1f} | {ttft:.1f} |" for name, tps, ttft in rows]
    table += ["",
              f"- HTTP decode / in-process decode: **{ratio:.3f}** (goal ≥ 0.97)",
              f"- time the HTTP layer adds to the first token (HTTP TTFT − engine TTFT "
              f"from the server log): **{added_ms:.1f} ms** (goal < 10 ms)",
              ""]
    print("\n".join(table))
    if args.record:
        results = ROOT / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n\nNewest last. Each entry: date, "
                               "model, machine, command.\n\n")
        with open(results, "a") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
