"""An agent session replayed through the HTTP API: how much each turn prefills.

    .venv/bin/python bench/bench_agent_session.py [--model M] [--turns 5]
        [--prompt-tokens 6000] [--context-tokens 0] [--warm-up] [--record]
        [-- PENSIEVE_OPTIONS...]

Starts `python pensieve.py`, then plays a conversation shaped like Claude
Code's: the system prompt it sent in tests/captures/claude-2.1.197/full-main.json
and as many of its tools, in its order, as fit --prompt-tokens (all of them
with --prompt-tokens 0); each turn appends the model's answer and a
tool-result-sized user message (~220 tokens), the last user message marked
with cache_control as the CLI does. Per turn: prompt tokens, tokens prefilled
(input + cache creation), tokens read from the prompt cache, and the client's
time to first token. At the end: the prompt cache's bytes against its bound,
MLX's peak memory and the server's peak RSS. Goal (issue 4): from turn 2 on
at most 5% of the prompt is prefilled and TTFT falls 10x against turn 1.
"""

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import (KEY, get_json, proc_memory, publish, start_server,  # noqa: E402
                    stop_server, stream)

CAPTURE = ROOT / "tests" / "captures" / "claude-2.1.197" / "full-main.json"
TOOL_RESULT = ("total 48\n-rw-r--r-- 1 dev dev  1203 README.md\n-rw-r--r-- 1 dev dev "
               "40321 pensieve.py\ndrwxr-xr-x 2 dev dev  4096 engine\n") * 3


def count(port, body):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/messages/count_tokens", json.dumps(
        {k: v for k, v in body.items() if k in ("model", "system", "tools", "messages")}),
        {"x-api-key": KEY, "content-type": "application/json"})
    n = json.loads(conn.getresponse().read())["input_tokens"]
    conn.close()
    return n


def user_turn(text):
    return {"role": "user", "content": [
        {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=6000,
                        help="add the CLI's tools while the prompt stays under this; "
                             "0: all of them")
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="also open the session with about this many tokens of "
                             "file contents (pensieve.py's source), as the CLI "
                             "attaches files")
    parser.add_argument("--warm-up", action="store_true",
                        help="send two unrelated requests first (GPU kernel compilation)")
    parser.add_argument("--server-log", help="keep the server's log in this file")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("server_args", nargs="*", help="more pensieve.py options")
    args = parser.parse_args()

    captured = json.loads(CAPTURE.read_text())["body"]
    body = {"model": captured["model"], "max_tokens": 16, "stream": True,
            "temperature": 0, "system": captured["system"], "tools": [],
            "messages": [user_turn("List the files and read the README.")]}
    if args.context_tokens:
        source = (ROOT / "pensieve.py").read_text()
        source = (source * (1 + 4 * args.context_tokens // len(source)))
        body["messages"][0]["content"].insert(0, {
            "type": "text", "text": "<system-reminder>Contents of pensieve.py:\n"
            + source[:4 * args.context_tokens] + "</system-reminder>"})
    log = open(args.server_log or os.devnull, "w")
    proc, port = start_server(args.model, log, args.server_args)
    rows = []
    try:
        # A warm-up that shares no prefix with the session: on a GPU the first
        # requests compile kernels, which would inflate turn 1.
        for words in (50, 1000) if args.warm_up else ():
            stream(port, {"model": "warm-up", "max_tokens": 4, "stream": True,
                          "messages": [{"role": "user", "content": "Warm up. " * words}]})
        for tool in captured["tools"]:
            body["tools"].append(tool)
            if args.prompt_tokens and count(port, body) > args.prompt_tokens:
                body["tools"].pop()
        for n in range(1, args.turns + 1):
            ttft, text, usage = stream(port, body)
            read = usage["input_tokens"] + usage["cache_creation_input_tokens"]
            cached = usage["cache_read_input_tokens"]
            rows.append((n, read + cached, read, cached, ttft * 1000))
            print(rows[-1], flush=True)
            body["messages"][-1]["content"][-1].pop("cache_control")
            body["messages"] += [{"role": "assistant", "content": text or "."},
                                 user_turn(TOOL_RESULT)]
        health = get_json(port, "/health")
        rss = proc_memory(proc.pid)
    finally:
        stop_server(proc, log)
    lines = [f"### {date.today()} — agent session, {platform.machine()} {os.cpu_count()} "
             f"cores, {args.model or 'embedded SmolLM2-135M-Instruct'}", "",
             f"`{' '.join(['bench/bench_agent_session.py'] + sys.argv[1:])}` — Claude "
             f"Code's captured system prompt with {len(body['tools'])} of its tools, 16 "
             "greedy tokens a turn, a tool-result-sized user message appended each turn",
             "",
             "| turn | prompt tokens | prefilled | from cache | prefilled % | TTFT ms |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p} | {i} | {c} | {100 * i / p:.1f} | {t:.0f} |"
              for n, p, i, c, t in rows]
    later = rows[1:]
    mb = 1024 * 1024
    lines += ["", f"- TTFT turn 1 / median of later turns: "
              f"**{rows[0][4] / sorted(r[4] for r in later)[len(later) // 2]:.1f}x**; "
              f"most prefilled from turn 2 on: "
              f"**{max(100 * r[2] / r[1] for r in later):.1f}%**",
              f"- memory at the end: prompt cache {health['prompt_cache_bytes'] / mb:.0f} "
              f"MiB in {health['prompt_cache_entries']} entries (bound "
              f"{health['prompt_cache_max_bytes'] / mb:.0f} MiB), MLX peak "
              f"{health.get('memory_peak_bytes', 0) / mb:.0f} MiB, server peak RSS "
              f"{rss / mb:.0f} MiB", ""]
    publish("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
