"""The README's commands, run as written (the port aside) or mapped to the test
that runs them.

Every command in a ``sh`` block must be known here: run by a test below, run
by ``make test`` itself, or exercised by a named test elsewhere (checked to
exist). A new command in the README without one fails
``test_every_readme_command_is_exercised``.

    .venv/bin/python -m pytest -q tests/test_readme.py
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, free_port, wait_healthy

README = (ROOT / "README.md").read_text()
DEFAULT_URL = "http://127.0.0.1:7777"


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def scripts():
    """(words, text) of each command in the sh blocks, split as bash would:
    quotes may span lines, a backslash continues one, comments are dropped."""
    out, pending = [], ""
    for block in blocks("sh"):
        for line in block.split("\n"):
            pending += line + "\n"
            try:
                words = shlex.split(pending.replace("\\\n", " "), comments=True)
            except ValueError:  # inside a quoted string
                continue
            if pending.rstrip().endswith("\\"):
                continue
            if words:
                out.append((words, pending.strip()))
            pending = ""
    return out


def commands():
    return [" ".join(words) for words, _ in scripts()]


# Commands exercised elsewhere: the prefix, and where.
ELSEWHERE = {
    # Listed first: "make test" is its prefix.
    "make test-fast": "make test, which runs those tests among the rest",
    "make test": "make test itself (.ci/run)",
    "python pensieve.py claude": "tests/test_cli.py::test_launcher_starts_a_server_and_runs_claude",
}


def runner(command):
    for prefix in ("curl", "make run", "python pensieve.py setup-claude-code"):
        if command.startswith(prefix):
            return prefix
    return next((where for prefix, where in ELSEWHERE.items()
                 if command.startswith(prefix)), None)


def test_every_readme_command_is_exercised():
    found = commands()
    assert len(found) >= 8  # the quick start, the checks, Claude Code's set-up
    assert [c for c in found if runner(c) is None] == []
    for where in ELSEWHERE.values():
        if "::" in where:
            path, name = where.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), where


def test_the_readme_curl_commands(real_server):
    curls = [text for words, text in scripts() if words[0] == "curl"]
    assert len(curls) == 3
    for command in curls:
        out = subprocess.run(["bash", "-c", command.replace(DEFAULT_URL, real_server)
                              .replace("curl ", "curl -sS --max-time 120 ", 1)],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (command, out.stderr)
        if command.endswith("/health"):
            assert json.loads(out.stdout)["status"] == "healthy"
        elif '"stream": true' in command:
            assert out.stdout.rstrip().endswith('data: {"type":"message_stop"}')
        else:
            assert json.loads(out.stdout)["type"] == "message"


def test_the_readme_python_snippet(real_server):
    snippet = next(b for b in blocks("python") if "anthropic.Anthropic" in b)
    out = subprocess.run([sys.executable, "-c", snippet.replace(DEFAULT_URL, real_server)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.process
def test_the_readme_claude_code_setup_commands(tmp_path):
    env = {**os.environ, "CLAUDE_CONFIG_DIR": str(tmp_path)}
    setup = [c for c in commands() if c.startswith("python pensieve.py setup-claude-code")]
    assert setup == ["python pensieve.py setup-claude-code",
                     "python pensieve.py setup-claude-code --undo"]
    for command in setup:
        argv = [sys.executable, *command.split()[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr
    assert not (tmp_path / "settings.json.pensieve-backup.json").exists()


@pytest.mark.process
def test_make_run_serves_the_embedded_model(tmp_path, cache_dir, smollm_dir):
    assert "make run" in commands()
    port = free_port()
    env = {**os.environ, "PENSIEVE_PORT": str(port), "PENSIEVE_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    assert f"Pensieve is serving SmolLM2-135M-Instruct at http://127.0.0.1:{port}" in output
