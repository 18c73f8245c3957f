"""Decode speed with constrained decoding on and off, for the same requests.

    .venv/bin/python bench/bench_constrained.py [--model M] [--tokens 64] [--runs 3]
        [--warm-ups 1] [--server-log PREFIX] [--record] [-- PENSIEVE_OPTIONS...]

Starts `python pensieve.py --grammar on` and `--grammar off` side by side
(the idle one waits on its queue) and sends each the same streaming requests
in turn, greedy (temperature 0), through the HTTP API:
  tool call      one tool whose schema has a string, an enum, a number and
                 an array of objects; tool_choice that tool, no parallel calls;
  json answer    output_config.format json_schema;
  text, tools    a plain question with the tool present and tool_choice auto
                 (the grammar allows free text: the cost of the mask alone).
Per request: the client's decode tok/s = (output tokens - 1) / (last
content_block_delta - first), and the engine's own from the server's
access-log line (tok_s: first token -> last on the engine thread). Each run
sends every case to both servers, alternating; ratios are medians of the
per-run ratios.
The client's figure needs deltas that follow the tokens: a tool call's
arguments stream only under the grammar (unconstrained, a call is checked
whole and sent at the end: n/a), and its first delta comes after the call's
head, so there the engine's figure is the one to compare. Greedy decoding
with and without the mask may still write different tokens (the token
counts say so); only the rates are compared. Goal: on >= 0.9x off. --record
appends the table to bench/RESULTS.md.
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

from common import KEY, publish, start_server, stop_server  # noqa: E402

TOOL = {
    "name": "create_event",
    "description": "Put an event in the team calendar.",
    "input_schema": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "priority": {"type": "string", "enum": ["low", "normal", "high"]},
            "duration_hours": {"type": "number"},
            "attendees": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                "required": ["name", "email"]}},
        },
        "required": ["title", "priority", "duration_hours", "attendees"],
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population_millions": {"type": "number"},
        "climate": {"type": "string", "enum": ["oceanic", "continental", "arid",
                                               "tropical"]},
        "landmarks": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "country", "population_millions", "climate", "landmarks"],
}
CASES = {
    "tool call (forced)": {
        "tools": [TOOL],
        "tool_choice": {"type": "tool", "name": TOOL["name"],
                        "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content":
                      "Schedule 'Q3 roadmap review', high priority, 1.5 hours, with "
                      "Alice (alice@example.com), Bob (bob@example.com) and Carol "
                      "(carol@example.com)."}]},
    "json answer (output_config)": {
        "output_config": {"format": {"type": "json_schema", "schema": ANSWER_SCHEMA}},
        "messages": [{"role": "user", "content":
                      "Describe Paris: its country, population, climate and five "
                      "landmarks."}]},
    "text, tools present (auto)": {
        "tools": [TOOL], "tool_choice": {"type": "auto"},
        "messages": [{"role": "user", "content":
                      "Write a long, detailed story about a dragon who learns to "
                      "write software."}]},
}
# The access-log line of a finished generation.
DONE = re.compile(r"POST /v1/messages 200 .* prompt=(\d+) cached=\d+ output=(\d+) "
                  r"ttft_ms=\S+ engine_ttft_ms=([\d.]+) tok_s=([\d.]+)")


def stream(port, case, tokens):
    """One streaming request; client-side timings, output and answer."""
    body = {"model": "bench", "max_tokens": tokens, "stream": True, "temperature": 0,
            **CASES[case]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    start = time.perf_counter()
    conn.request("POST", "/v1/messages", json.dumps(body),
                 {"x-api-key": KEY, "content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{case}: {response.status} {response.read()[:300]!r}")
    times, blocks, usage, stop = [], [], {}, None
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = json.loads(line[6:])
        if data["type"] == "content_block_start":
            blocks.append([data["content_block"]["type"], ""])
        elif data["type"] == "content_block_delta":
            times.append(time.perf_counter())
            delta = data["delta"]
            blocks[-1][1] += delta.get("text") or delta.get("partial_json") or ""
        elif data["type"] == "message_delta":
            usage, stop = data["usage"], data["delta"].get("stop_reason")
        elif data["type"] == "error":
            raise RuntimeError(f"{case}: {data['error']}")
    conn.close()
    n = usage["output_tokens"]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {"tokens": n, "tps": (n - 1) / span if n > 1 and span > 0 else None,
            "total": time.perf_counter() - start, "stop": stop,
            "kinds": "+".join(k for k, _ in blocks)}


def engine_rates(log_path):
    return [{"engine_tps": float(m[3])}
            for m in DONE.findall(Path(log_path).read_text())]


def ratio(on, off, key):
    pairs = [a[key] / b[key] for a, b in zip(on, off) if a[key] and b[key]]
    return statistics.median(pairs) if pairs else None


def fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)


def answers(rows):
    """The answers' block kinds and stop reasons, e.g. 'tool_use, max_tokens'."""
    return "; ".join(sorted({f"{r['kinds']}, {r['stop']}" for r in rows}))


def med(rows, key):
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="as pensieve.py --model")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warm-ups", type=int, default=1,
                        help="unmeasured rounds first (GPU: kernel compilation)")
    parser.add_argument("--server-log", help="keep the servers' logs as PREFIX-on.log "
                        "and PREFIX-off.log")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("server_args", nargs="*", help="more pensieve.py options")
    args = parser.parse_args()

    modes = ("on", "off")
    logs, servers, results = {}, {}, {m: {c: [] for c in CASES} for m in modes}
    try:
        for mode in modes:
            path = (f"{args.server_log}-{mode}.log" if args.server_log else
                    tempfile.NamedTemporaryFile(suffix=f"-{mode}.log", delete=False).name)
            logs[mode] = open(path, "w+")
            servers[mode] = start_server(args.model, logs[mode],
                                         ["--grammar", mode, *args.server_args])
        conn = http.client.HTTPConnection("127.0.0.1", servers["on"][1], timeout=60)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        conn.close()
        sent = {m: [] for m in modes}  # per server, every request in order (warm-ups too)
        for run in range(args.warm_ups + args.runs):
            for case in CASES:
                for mode in modes if run % 2 == 0 else modes[::-1]:
                    r = stream(servers[mode][1], case, args.tokens)
                    sent[mode].append(r)
                    print(f"{'warm-up' if run < args.warm_ups else f'run {run}'} "
                          f"{mode:3} {case}: {r['tokens']} tokens, {fmt(r['tps'])} "
                          f"tok/s, {r['kinds']}, {r['stop']}",
                          flush=True)
                    if run >= args.warm_ups:
                        results[mode][case].append(r)
    finally:
        for mode, (proc, _) in servers.items():
            stop_server(proc, logs[mode])
    for mode in modes:
        logged = engine_rates(logs[mode].name)
        if len(logged) != len(sent[mode]):
            raise RuntimeError(f"{logs[mode].name}: {len(logged)} access-log lines "
                               f"of generations for {len(sent[mode])} requests")
        for r, e in zip(sent[mode], logged):
            r.update(e)
        if not args.server_log:
            os.unlink(logs[mode].name)
    publish(report(args, health, results), args.record)


def report(args, health, results):
    on, off = results["on"], results["off"]
    machine = (f"{platform.machine()} {os.cpu_count()} cores, {health['device']}, "
               f"{health['weights']}")
    lines = [f"### {date.today()} — constrained decoding, {health['model']}, {machine}",
             "", f"`{' '.join(['bench/bench_constrained.py'] + sys.argv[1:])}` — "
             f"up to {args.tokens} output tokens, greedy, streaming; `--grammar on` "
             f"and `off` servers side by side, {args.runs} alternating runs after "
             f"{args.warm_ups} warm-up, medians", "",
             "| case | tokens on/off | client tok/s on | off | on/off | engine tok/s on "
             "| off | on/off | answer on / off |", "|---" * 9 + "|"]
    worst = []
    for case in CASES:
        a, b = on[case], off[case]
        engine = ratio(a, b, "engine_tps")
        worst.append(engine)
        lines.append(
            f"| {case} | {fmt(med(a, 'tokens'), '.0f')}/{fmt(med(b, 'tokens'), '.0f')} "
            f"| {fmt(med(a, 'tps'))} | {fmt(med(b, 'tps'))} | "
            f"{fmt(ratio(a, b, 'tps'), '.3f')} | {fmt(med(a, 'engine_tps'))} | "
            f"{fmt(med(b, 'engine_tps'))} | **{fmt(engine, '.3f')}** | "
            f"{answers(a)} / {answers(b)} |")
    known = [w for w in worst if w is not None]
    lines += ["", f"- engine decode, grammar on / off, lowest case: "
              f"**{fmt(min(known) if known else None, '.3f')}** (goal ≥ 0.9)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
