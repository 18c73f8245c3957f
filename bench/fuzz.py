"""A long fuzzing run: tests/test_fuzz.py with more cases, counted and timed.

    .venv/bin/python bench/fuzz.py [--examples 20] [--record] [-- PYTEST_ARGS...]

Runs ``pytest tests/test_fuzz.py -q -s`` with PENSIEVE_FUZZ_EXAMPLES set to
--examples (a multiplier of the test file's default counts: 300 + 300 HTTP
cases and 2,000 parser cases at 1), then prints how many cases each test ran
(its ``fuzz cases:`` lines), the outcome and the duration. --record appends
the same as an entry to bench/RESULTS.md. The exit status is pytest's.
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNT_LINE = re.compile(r"^fuzz cases: (\S+) (\d+)$", re.MULTILINE)
SECTION = "## Fuzzing: garbage in, a 4xx or a close out"
SECTION_INTRO = f"""{SECTION}

`bench/fuzz.py` runs tests/test_fuzz.py with more cases than the test suite
does: HTTP requests built from valid pieces and damaged, sent to a server on
a scripted engine whole, byte by byte and in pieces, and the request parser
called directly with arbitrary JSON and bytes. The invariant: a 4xx (a 2xx
for input that happens to be valid) or a closed connection, never a 5xx or a
logged traceback, and the server keeps serving. "answered": cases that got at
least one response (the rest were closed without one, or sent nothing the
server could begin to parse).

"""
SUMMARY_LINE = re.compile(r"^=*\s*(\d+ (?:passed|failed|error).*?)\s*=*$", re.MULTILINE)


def run(examples, pytest_args):
    command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-s",
               "-p", "no:cacheprovider", *pytest_args]
    env = {**os.environ, "PENSIEVE_FUZZ_EXAMPLES": str(examples)}
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    return proc.returncode, output, elapsed


def summary(output, returncode):
    found = SUMMARY_LINE.findall(output)
    if found:
        return found[-1]
    return f"pytest exited with {returncode}"


def report(args, returncode, output, elapsed):
    counts = COUNT_LINE.findall(output)
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    command = " ".join(["bench/fuzz.py"] + sys.argv[1:])
    lines = [f"### {date.today()} — fuzzing, {machine}", "",
             f"`{command}` — tests/test_fuzz.py with PENSIEVE_FUZZ_EXAMPLES="
             f"{args.examples}, one ScriptedEngine server on loopback", "",
             "| test | cases |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in counts]
    total = sum(int(count) for name, count in counts if "/" not in name)
    lines += ["", f"- cases in all: **{total}**; outcome: **{summary(output, returncode)}**"
                  f"; {elapsed:.0f} s", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=float, default=20,
                        help="multiplier of the default case counts (default 20)")
    parser.add_argument("--record", action="store_true",
                        help="append the result to bench/RESULTS.md")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments")
    args = parser.parse_args()
    returncode, output, elapsed = run(args.examples, args.pytest_args)
    if returncode != 0:
        print(output)  # the falsifying examples and tracebacks
    table = report(args, returncode, output, elapsed)
    print(table)
    if args.record:
        results = ROOT / "bench" / "RESULTS.md"
        text = results.read_text()
        with open(results, "a") as f:
            f.write("" if text.endswith("\n\n") else "\n")
            if SECTION not in text:
                f.write(SECTION_INTRO)
            f.write(table + "\n")
    sys.exit(returncode)


if __name__ == "__main__":
    main()
