"""Claude Code's default mode on the embedded model: the first turn, and the
turn after a real tool round, read from the prompt cache.

    .venv/bin/python bench/bench_claude_code.py [--cli PATH] [--lines N] [--record]

Runs the real Claude Code CLI (``claude -p``, its default mode: the whole tool
set, tool search on) against an in-process Pensieve server on the embedded
SmolLM2 at its default 32k window, greedy, with the environment
``setup-claude-code`` writes. Turn 1 asks about a file; the model's answer is
a Read call of that file (scripted, as the tests do it: the 135M model never
calls a tool by itself; the real engine still reads the whole prompt first);
the CLI runs the Read and sends its result (a file of N numbered lines, ~50
tokens each, 12 by default); the real
model answers turn 2. Per request, from the server's access log: prompt
tokens, tokens read from the cache, tokens prefilled, time to first token
(arrival to first content). Goal: turn 2 reads >= 95% of its prompt from the
cache and its first token comes in <= 10% of turn 1's time. --record appends
the table to bench/RESULTS.md.
"""

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the scripted-call engine the tests use

from common import publish  # noqa: E402
from engine.models import use_openblas  # noqa: E402

use_openblas()  # before MLX is imported, as the server does
import engine  # noqa: E402
from engine.attention import cores  # noqa: E402
import pensieve  # noqa: E402
from helpers import ScriptedCalls, ServerThread, claude_cli  # noqa: E402


def notes(lines):
    return "\n".join(
        f"{i}. The build step {i} compiles module m{i} with flags -O2 and writes "
        f"out/m{i}.o; it depends on step {i - 1} and takes about {i * 3} seconds."
        for i in range(1, lines + 1))


MAX_OUTPUT = 64


class AccessLog(logging.Handler):
    """Keeps the fields of each access-log line."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        fields = getattr(record, "fields", None)
        if fields and fields.get("path") == "/v1/messages":
            self.lines.append(fields)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cli", default=claude_cli(), help="the claude binary")
    parser.add_argument("--lines", type=int, default=12, help="lines of the file read")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from engine.models import embedded_gguf, imported_dir

    model_dir = imported_dir(embedded_gguf())
    access = AccessLog()
    logging.getLogger("pensieve.access").addHandler(access)
    logging.getLogger("pensieve.access").setLevel(logging.INFO)
    wrapper = ScriptedCalls(engine.Engine(str(model_dir), context_window=32768))
    server = ServerThread(pensieve.Config(host="127.0.0.1", port=0, model=str(model_dir),
                                          default_temperature=0.0), engine=wrapper).start()
    work = Path(tempfile.mkdtemp(prefix="pensieve-bench-"))
    text = notes(args.lines)
    (work / "notes.txt").write_text(text + "\n")
    wrapper.calls = [("Read", {"file_path": str(work / "notes.txt")})]
    env = {**os.environ,
           **pensieve.claude_env(pensieve.Config(port=server.port),
                                 (server.server.models.info.name, 32768)),
           "CLAUDE_CONFIG_DIR": str(work / "claude-config"),
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT),
           # The model rarely ends its turn within the cap at this depth; the
           # CLI would then compact after each capped answer (minutes here).
           "DISABLE_AUTO_COMPACT": "1"}
    try:
        out = subprocess.run([args.cli, "-p", "What does notes.txt say about step 3?",
                              "--allowedTools", "Read"], cwd=work, env=env,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=3600)
    finally:
        server.stop()
    version = subprocess.run([args.cli, "--version"], capture_output=True,
                             text=True).stdout.strip()
    result = next((m for r, _, _ in wrapper.seen for m in r.messages if m.role == "tool"),
                  None)
    rows = []
    for n, line in enumerate(access.lines, 1):
        read = line["prompt_tokens"] - line["cached_tokens"]
        rows.append(f"| {n} | {line['prompt_tokens']} | {line['cached_tokens']} "
                    f"({line['cached_tokens'] / line['prompt_tokens']:.1%}) | {read} | "
                    f"{line['ttft_ms'] / 1000:.1f} | {line['stop_reason']} |")
    first, second = access.lines[0], access.lines[1]
    table = "\n".join([
        "| turn | prompt tokens | read from the cache | prefilled | time to first "
        "token (s) | stop |", "|---|---|---|---|---|---|", *rows])
    summary = (f"- turn 2 (after a Read of {len(text)} characters, a tool result of "
               f"{second['prompt_tokens'] - first['prompt_tokens']} tokens with the call): "
               f"{second['cached_tokens'] / second['prompt_tokens']:.1%} of its prompt from "
               f"the cache (goal >= 95%); first token in "
               f"{second['ttft_ms'] / first['ttft_ms']:.1%} of turn 1's time (goal <= 10%)\n"
               f"- the CLI exited {out.returncode}"
               + (f" ({(out.stdout + out.stderr).strip()[-120:]!r})" if out.returncode else "")
               + f"; the Read result reached the model: {result is not None and 'step 3' in result.text}")
    publish(f"## Claude Code {version.split()[0]} in its default mode on the embedded "
            f"model ({date.today()})\n\n"
            f"`python bench/bench_claude_code.py --lines {args.lines} --record`; "
            f"{platform.machine()}, {os.cpu_count()} cores, CPU backend, float32 "
            f"({use_openblas()}), attention split over "
            f"{min(cores(), 2)} core(s), SmolLM2-135M at "
            f"32768 tokens (yarn-notemp), greedy, `CLAUDE_CODE_MAX_OUTPUT_TOKENS={MAX_OUTPUT}`;"
            f" from the server's access log.\n\n{table}\n\n{summary}", args.record)


if __name__ == "__main__":
    main()
