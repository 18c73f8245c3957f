"""What auto mode's safety check adds to a reply: the judge alone, and over
HTTP for calls the rules decide and calls the served model decides.

    .venv/bin/python bench/bench_auto_mode.py [--replies N] [--model-replies N] [--record]

1. The judge alone (safeguards.judge) over every call of the test tables
   (tests/test_safeguards.py: risky and everyday), each timed on its own.
2. An in-process server on the embedded SmolLM2 (8k window, greedy) answering
   a forced Bash call (its command fixed by the tool's schema) with the
   request's ``safeguards`` taken from Claude Code 2.1.332's auto mode: the
   check's own time (``check_ms`` in the access log: from the reply's end to
   its verdicts) beside the reply's whole time, for a call the policy decides
   (``git status``), and with ``--auto-mode-check model`` for one it leaves
   open (``frobnicate --all``), which the served model judges.
Goal: < 5 ms for rule-decided calls. --record appends the table to
bench/RESULTS.md.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the judge's tables, the in-process server

from common import publish  # noqa: E402
from engine.models import embedded_gguf, imported_dir, use_openblas  # noqa: E402

use_openblas()  # before MLX is imported, as the server does
import pensieve  # noqa: E402
import test_safeguards as tables  # noqa: E402
from helpers import API_KEY, ServerThread  # noqa: E402
from safeguards import Context, judge  # noqa: E402

SAFEGUARDS = json.loads((ROOT / "tests" / "captures" / "claude-2.1.332" / "auto-main.json")
                        .read_text())["body"]["safeguards"]


def spread(values):
    """(median, p90, max) of a list of numbers."""
    values = sorted(values)
    return (statistics.median(values), values[min(len(values) - 1, int(len(values) * 0.9))],
            values[-1])


def judge_alone(rounds=5):
    rows = tables.RISKY + tables.EVERYDAY
    cases = [(row[1], row[2], Context.from_json(tables.context(**row[3]))) for row in rows]
    times = []
    for _ in range(rounds):
        for name, tool_input, context in cases:
            started = time.perf_counter()
            judge(name, tool_input, context)
            times.append((time.perf_counter() - started) * 1000)
    return len(cases), spread(times)


class AccessLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.fields = []

    def emit(self, record):
        self.fields.append(getattr(record, "fields", {}))


def forced(url, command):
    schema = {"type": "object", "properties": {"command": {"enum": [command]}},
              "required": ["command"], "additionalProperties": False}
    body = {"model": "claude-opus-5-5", "max_tokens": 40, "temperature": 0.0,
            "tools": [{"name": "Bash", "description": "Run a command.",
                       "input_schema": schema}],
            "tool_choice": {"type": "tool", "name": "Bash"},
            "messages": [{"role": "user", "content": "Run it."}], "safeguards": SAFEGUARDS}
    request = urllib.request.Request(url + "/v1/messages", json.dumps(body).encode(),
                                     {"content-type": "application/json",
                                      "x-api-key": API_KEY})
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.load(reply)
    status = answer["safeguard_results"][0]["status"]
    return next(iter(status["tool_uses"].values()))


def over_http(server, log, command, replies):
    """(check ms, reply ms, verdicts seen) over ``replies`` answers, after one
    warm-up (the prompt lands in the cache as Claude Code's do)."""
    def logged(n):  # the access log is written once the answer is out
        deadline = time.monotonic() + 10
        while len(log.fields) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    log.fields.clear()
    forced(server.url, command)
    logged(1)
    log.fields.clear()
    seen = [forced(server.url, command) for _ in range(replies)]
    logged(replies)
    checks = [f["check_ms"] for f in log.fields]
    whole = [f["ms"] for f in log.fields]
    return checks, whole, seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=20)
    parser.add_argument("--model-replies", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    calls, alone = judge_alone()
    log = AccessLog()
    access = logging.getLogger("pensieve.access")
    access.addHandler(log)
    access.setLevel(logging.INFO)
    model_dir = imported_dir(embedded_gguf())
    server = ServerThread(pensieve.Config(host="127.0.0.1", port=0, model=str(model_dir),
                                          context_window=8192)).start()
    try:
        policy_checks, policy_whole, policy_seen = over_http(server, log, "git status",
                                                             args.replies)
        server.server.api.check.mode = "model"  # the same server, now asking its model
        model_checks, model_whole, model_seen = over_http(server, log, "frobnicate --all",
                                                          args.model_replies)
    finally:
        server.stop()
    assert {v["outcome"] for v in policy_seen} == {"not_flagged"}
    outcomes = sorted({v["outcome"] for v in model_seen})
    loaded = server.server.models.info
    lines = [
        f"### {date.today()} — auto mode's check, {platform.machine()} "
        f"{os.cpu_count()} cores, {loaded.device}, {loaded.weights}",
        "",
        f"`bench/bench_auto_mode.py --replies {args.replies} --model-replies "
        f"{args.model_replies}` — median / p90 / max, ms",
        "",
        "| what | n | check | the reply, whole |",
        "|---|---|---|---|",
        "| the judge alone, every table call (tests/test_safeguards.py) | "
        f"{calls} x 5 | {alone[0]:.3f} / {alone[1]:.3f} / {alone[2]:.3f} | |",
    ]
    for label, checks, whole in (
            ("rule-decided call over HTTP (`git status`)", policy_checks, policy_whole),
            (f"model-decided call, `--auto-mode-check model` (`frobnicate --all`; "
             f"verdicts: {', '.join(outcomes)})", model_checks, model_whole)):
        c, w = spread(checks), spread(whole)
        lines.append(f"| {label} | {len(checks)} | {c[0]:.2f} / {c[1]:.2f} / {c[2]:.2f} | "
                     f"{w[0]:.0f} / {w[1]:.0f} / {w[2]:.0f} |")
    publish("\n".join(lines) + "\n", args.record)


if __name__ == "__main__":
    main()
