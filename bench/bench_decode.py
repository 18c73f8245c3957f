"""Decode speed and time to first token: through Pensieve's HTTP API and in-process.

    .venv/bin/python bench/bench_decode.py [--model M] [--tokens 128] [--runs 5] [--record]

For the same model, prompt and greedy decoding, runs alternate between:
  in-process  mlx-lm's stream_generate on the model as the server loads it
              (engine.models.load: same weights format, same BLAS);
  http        `python pensieve.py` in a subprocess, one streaming request over
              a real socket: TTFT = request sent -> first text delta; decode
              tok/s = (output tokens - 1) / (last delta - first delta).
Alternating pairs, each after a warm-up, means a noisy machine slows both
sides alike; the ratio reported is the median of the per-pair ratios. The
server's access-log line gives the engine's own TTFT (prefill and first
token); the client's TTFT minus it, over 15 short requests, is what the
server adds: HTTP, parsing, template and tokenizer, the thread hand-offs. --record appends
the table to bench/RESULTS.md.
"""

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import KEY, PROMPT, local_once, publish, start_server, stop_server  # noqa: E402

TTFT_SAMPLES = 15


def http_once(port, tokens):
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


def measure(spec, tokens, runs):
    from engine.models import load

    loaded = load(spec)  # OpenBLAS before MLX, float32 on CPU: as the server does
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc, port = start_server(spec, log)
    try:
        local_once(loaded, tokens), http_once(port, tokens)  # warm-up
        local, served = [], []
        for _ in range(runs):
            local.append(local_once(loaded, tokens))
            served.append(http_once(port, tokens))
        # Short requests for the first-token overhead: many samples, each with
        # the next token already computing (as in every real stream).
        short = [http_once(port, 8) for _ in range(TTFT_SAMPLES)]
    finally:
        stop_server(proc, log)
    logged = re.findall(r"POST /v1/messages 200 .* engine_ttft_ms=([\d.]+) tok_s=([\d.]+)",
                        Path(log.name).read_text())
    for r, (ttft, tps) in zip(served + short, logged[1:]):
        r["engine_ttft"], r["engine_tps"] = float(ttft) / 1000, float(tps)
    os.unlink(log.name)
    return loaded, local, served, short


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def report(args, loaded, local, served, short):
    ratios = [s["tps"] / l["tps"] for l, s in zip(local, served)]
    added = sorted((r["ttft"] - r["engine_ttft"]) * 1000 for r in short)
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {loaded.device}, "
               f"{loaded.weights}")
    rows = [
        ("in-process mlx-lm", median(local, "tps"), median(local, "ttft") * 1000),
        ("HTTP (pensieve), seen by the client", median(served, "tps"),
         median(served, "ttft") * 1000),
        ("  its engine thread (server log)", median(served, "engine_tps"),
         median(served, "engine_ttft") * 1000),
    ]
    lines = [f"### {date.today()} — {loaded.name}, {machine}", "",
             f"`{' '.join(['bench/bench_decode.py'] + sys.argv[1:])}` — prompt "
             f"{local[0]['prompt']} tokens, {median(served, 'tokens'):.0f} output "
             f"tokens, greedy, {args.runs} alternating pairs after a warm-up, medians",
             "", "| path | decode tok/s | TTFT ms |", "|---|---|---|"]
    lines += [f"| {name} | {tps:.1f} | {ttft:.1f} |" for name, tps, ttft in rows]
    lines += ["",
              f"- HTTP decode / in-process decode, median of per-pair ratios: "
              f"**{statistics.median(ratios):.3f}** (pairs: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; goal ≥ 0.97)",
              f"- time the server adds to the first token (client TTFT − the engine's "
              f"own TTFT from the server log, {TTFT_SAMPLES} requests): median "
              f"**{statistics.median(added):.1f} ms**, p90 "
              f"{added[int(len(added) * 0.9)]:.1f} ms (goal < 10 ms)", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="as pensieve.py --model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    publish(report(args, *measure(args.model, args.tokens, args.runs)), args.record)


if __name__ == "__main__":
    main()
