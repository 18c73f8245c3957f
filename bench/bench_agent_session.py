"""An agent session replayed through the HTTP API: how much each turn prefills.

    .venv/bin/python bench/bench_agent_session.py [--model M] [--turns 5] [--record]

Starts `python pensieve.py`, then plays a conversation shaped like Claude
Code's: the system prompt and Bash/Read tool list it sent in
tests/captures/claude-2.1.197/full-main.json (trimmed to the tools that fit an
8k window), each turn appending the model's answer and a tool-result-sized
user message. Per turn: prompt tokens, tokens prefilled (usage.input_tokens),
tokens read from the prompt cache, and the client's time to first token.
Goal (issue 4): from turn 2 on at most 5% of the prompt is prefilled and TTFT
falls 10x against turn 1.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_decode import KEY, publish, start_server, stop_server  # noqa: E402

CAPTURE = ROOT / "tests" / "captures" / "claude-2.1.197" / "full-main.json"
TOOL_RESULT = ("total 48\n-rw-r--r-- 1 dev dev  1203 README.md\n-rw-r--r-- 1 dev dev "
               "40321 pensieve.py\ndrwxr-xr-x 2 dev dev  4096 engine\n") * 3


def stream(port, body):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/messages?beta=true", json.dumps(body),
                 {"x-api-key": KEY, "content-type": "application/json"})
    first, text, usage = None, [], {}
    for line in conn.getresponse():
        if not line.startswith(b"data: "):
            continue
        data = json.loads(line[6:])
        if data["type"] == "content_block_delta":
            first = first or time.perf_counter()
            text.append(data["delta"]["text"])
        elif data["type"] == "message_delta":
            usage = data["usage"]
    conn.close()
    return (first or time.perf_counter()) - start, "".join(text), usage


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    captured = json.loads(CAPTURE.read_text())["body"]
    body = {"model": captured["model"], "max_tokens": 16, "stream": True,
            "temperature": 0, "system": captured["system"],
            "tools": [t for t in captured["tools"] if t["name"] in ("Bash", "Read")],
            "messages": [{"role": "user", "content": "List the files and read the README."}]}
    log = open(os.devnull, "w")
    proc, port = start_server(args.model, log)
    rows = []
    try:
        for n in range(1, args.turns + 1):
            ttft, text, usage = stream(port, body)
            prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
            rows.append((n, prompt, usage["input_tokens"], usage["cache_read_input_tokens"],
                         ttft * 1000))
            print(rows[-1], flush=True)
            body["messages"] += [{"role": "assistant", "content": text or "."},
                                 {"role": "user", "content": TOOL_RESULT}]
    finally:
        stop_server(proc, log)
    lines = [f"### {date.today()} — agent session, {platform.machine()} {os.cpu_count()} "
             f"cores, {args.model or 'embedded SmolLM2-135M-Instruct'}", "",
             f"`{' '.join(['bench/bench_agent_session.py'] + sys.argv[1:])}` — Claude "
             "Code's captured system prompt with its Bash and Read tools, 16 greedy "
             "tokens a turn, a tool-result-sized user message appended each turn", "",
             "| turn | prompt tokens | prefilled | from cache | prefilled % | TTFT ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p} | {i} | {c} | {100 * i / p:.1f} | {t:.0f} |"
              for n, p, i, c, t in rows]
    lines += ["", f"- TTFT turn 1 / median of later turns: "
              f"**{rows[0][4] / sorted(r[4] for r in rows[1:])[len(rows[1:]) // 2]:.1f}x**",
              ""]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
