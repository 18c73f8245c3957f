"""What the server tells its operator: /metrics, the access log, JSON logs.

/metrics is read with Prometheus's own text parser (prometheus_client), over
a real socket, from a scripted engine (exact counts) and from the real engine
on the tiny model (prefix-cache hits, model load time). The access log is one
record per request on ``pensieve.access``; ``--log-format json`` is checked
on the real process.

    .venv/bin/python -m pytest -q tests/test_operability.py
"""

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import (ROOT, RawConnection, body, call, free_port, raw_request, wait_healthy,
                     wait_until)
from prometheus_client.parser import text_string_to_metric_families

from engine import Accepted, Finished, TextDelta, progress

DONE = Finished("end_turn", None, 7, 3, 0.05, 20.0, cached_tokens=4)


def script(request):
    return [Accepted(7, request.max_tokens), TextDelta("Hello"), TextDelta(" world"),
            TextDelta("!"), DONE]


def metrics(srv):
    """{(name, frozenset(labels)): value} of every sample /metrics shows."""
    reply = call(srv, "GET", "/metrics", key=None)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def test_metrics_count_requests_tokens_and_latency(scripted):
    srv = scripted(script)
    before = metrics(srv)
    assert call(srv, "POST", "/v1/messages", body()).status == 200
    assert call(srv, "POST", "/v1/messages", body(stream=True)).status == 200
    assert call(srv, "POST", "/v1/messages", body(), key="wrong").status == 401
    assert call(srv, "GET", "/nowhere").status == 404
    assert call(srv, "GET", "/v1/models/some-model").status == 200
    after = metrics(srv)
    requests = "pensieve_requests_total"
    assert value(after, requests, route="/v1/messages", status="200") == 2
    assert value(after, requests, route="/v1/messages", status="401") == 1
    assert value(after, requests, route="other", status="404") == 1
    assert value(after, requests, route="/v1/models/{id}", status="200") == 1
    # /metrics counts itself once it has answered: the first read shows none.
    assert value(before, requests, route="/metrics", status="200") == 0
    assert value(after, requests, route="/metrics", status="200") == 1
    assert value(after, "pensieve_input_tokens_total") == 14
    assert value(after, "pensieve_cached_tokens_total") == 8
    assert value(after, "pensieve_output_tokens_total") == 6
    ttft = "pensieve_time_to_first_token_seconds"
    assert value(after, f"{ttft}_count") == 2
    assert value(after, f"{ttft}_bucket", le="+Inf") == 2
    per_token = "pensieve_time_per_output_token_seconds"
    assert value(after, f"{per_token}_count") == 2
    assert value(after, f"{per_token}_sum") == pytest.approx(2 / 20.0)
    assert value(after, f"{per_token}_bucket", le="0.05") == 2
    assert value(after, f"{per_token}_bucket", le="0.025") == 0
    assert value(after, "pensieve_requests_running") == 0
    assert value(after, "pensieve_model_info", model="scripted", device="cpu",
                 context_window="1000") == 1


def test_metrics_from_the_real_engine(tiny_server):
    ask = {"model": "m", "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "user", "content": "The same prompt, twice over."}]}
    before = metrics(tiny_server)
    for _ in range(2):
        assert call(tiny_server, "POST", "/v1/messages", ask).status == 200
    after = metrics(tiny_server)
    grew = {name: value(after, name) - value(before, name) for name in (
        "pensieve_input_tokens_total", "pensieve_cached_tokens_total",
        "pensieve_output_tokens_total")}
    assert grew["pensieve_output_tokens_total"] == 8
    # The second request read all but its last prompt token from the cache.
    assert 0 < grew["pensieve_cached_tokens_total"] < grew["pensieve_input_tokens_total"]
    assert value(after, "pensieve_prompt_cache_bytes") > 0
    assert value(after, "pensieve_prompt_cache_max_bytes") > 0
    assert value(after, "pensieve_model_load_seconds") > 0


def access_records(caplog, *request_ids):
    """The access records of these requests, in order: an earlier test's
    server may still write its last record while this test runs."""
    return [r for r in caplog.records
            if r.name == "pensieve.access" and r.fields["request_id"] in request_ids]


def test_one_access_record_per_request(scripted, caplog):
    srv = scripted(script)
    with caplog.at_level(logging.INFO, logger="pensieve.access"):
        reply = call(srv, "POST", "/v1/messages", body())
        wrong = call(srv, "GET", "/v1/models", key="wrong")
        ids = reply.headers["request-id"], wrong.headers["request-id"]
        # Written once the answer is out: the client may read it first.
        wait_until(lambda: len(access_records(caplog, *ids)) == 2)
    done, refused = access_records(caplog, *ids)
    assert done.fields == {
        "request_id": reply.headers["request-id"], "method": "POST", "path": "/v1/messages",
        "status": 200, "ms": done.fields["ms"], "model": "claude-test",
        "prompt_tokens": 7, "cached_tokens": 4, "output_tokens": 3,
        "ttft_ms": done.fields["ttft_ms"], "engine_ttft_ms": 50.0, "tok_s": 20.0,
        "stop_reason": "end_turn"}
    assert done.fields["ttft_ms"] > 0 and done.fields["ms"] >= done.fields["ttft_ms"]
    line = done.getMessage()
    assert line.startswith(f"{reply.headers['request-id']} POST /v1/messages 200 ")
    assert "prompt=7 cached=4 output=3" in line and "stop=end_turn" in line
    assert refused.fields["status"] == 401 and "prompt_tokens" not in refused.fields


def test_a_client_that_leaves_is_logged_as_499(scripted, caplog):
    srv = scripted(lambda request: [Accepted(7, 16), TextDelta("a"), 30, DONE])
    with caplog.at_level(logging.INFO, logger="pensieve.access"):
        with RawConnection(srv.port) as conn:
            conn.send(raw_request(payload=body(stream=True)))
            head = conn.read_until(b'"text":"a"').decode()
        request_id = re.search(r"request-id: (\S+)", head, re.IGNORECASE).group(1)
        wait_until(lambda: access_records(caplog, request_id))
    assert access_records(caplog, request_id)[0].fields["status"] == 499
    assert value(metrics(srv), "pensieve_requests_total", route="/v1/messages",
                 status="499") == 1


@pytest.mark.process
def test_json_logs_carry_the_access_fields(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PENSIEVE_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pensieve.py"), "--model", str(tiny_model_dir),
         "--port", str(port), "--cpu-weights", "stored", "--log-format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        import anthropic

        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}",
                                     api_key="pensieve-local-token", max_retries=0)
        client.messages.create(model="m", max_tokens=2,
                               messages=[{"role": "user", "content": "hi"}])
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "pensieve.access"
              and e["path"] == "/v1/messages"]
    assert len(access) == 1
    assert access[0]["status"] == 200 and access[0]["output_tokens"] == 2
    assert access[0]["request_id"].startswith("req_")
    # Start-up steps are logged, as they are when no terminal watches.
    messages = [e["message"] for e in entries]
    name = tiny_model_dir.name
    assert f"loading {name} ..." in messages
    assert any(m.startswith(f"loading {name}: done in ") for m in messages)
    assert any(m.startswith("warming up: done in ") for m in messages)


# --- First run: the banner, the console command, a config file ------------------------


@pytest.mark.process
def test_the_pensieve_command_serves_and_prints_a_banner(tiny_model_dir, tmp_path):
    command = os.path.join(os.path.dirname(sys.executable), "pensieve")
    assert os.access(command, os.X_OK), "pip install -e . installs the console command"
    port = free_port()
    proc = subprocess.Popen(
        [command, "--model", str(tiny_model_dir), "--port", str(port),
         "--cpu-weights", "stored", "--log-level", "warning"],
        env={**os.environ, "PENSIEVE_CACHE_DIR": str(tmp_path)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    url = f"http://127.0.0.1:{port}"
    assert f"Pensieve is serving {tiny_model_dir.name} at {url}" in output
    assert "context window 256 tokens, CPU backend" in output
    assert "API key  pensieve-local-token" in output
    # The launcher first: it sets the served model's name and window too.
    assert "Claude Code:  pensieve claude" in output
    assert "pensieve setup-claude-code" in output


def test_a_config_file_sets_options_below_variables_and_flags(tmp_path, monkeypatch):
    import pensieve

    path = tmp_path / "pensieve.toml"
    path.write_text('port = 8123\napi_key = "from-file"\ngrammar = false\n'
                    'allowed-host = ["a.lan", "b.lan"]\nshutdown-timeout = 5\n')
    for name in ("PORT", "API_KEY", "GRAMMAR", "ALLOWED_HOSTS", "SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(f"PENSIEVE_{name}", raising=False)
    config, *_ = pensieve.parse_args(["--config", str(path)])
    assert (config.port, config.api_key, config.grammar) == (8123, "from-file", False)
    assert config.allowed_hosts == ("a.lan", "b.lan") and config.shutdown_timeout == 5
    monkeypatch.setenv("PENSIEVE_PORT", "8124")
    assert pensieve.parse_args(["--config", str(path)])[0].port == 8124
    assert pensieve.parse_args(["--config", str(path), "--port", "8125"])[0].port == 8125
    monkeypatch.setenv("PENSIEVE_CONFIG", str(path))
    assert pensieve.parse_args([])[0].api_key == "from-file"


@pytest.mark.process
@pytest.mark.parametrize("text, message", [
    ("prot = 1\n", "unknown option 'prot'"),
    ("port = \"x\"\n", "argument --port: invalid port value: 'x'"),
    ("port = [\n", "not valid TOML"),
    ("log-level = \"loud\"\n", "argument --log-level: invalid choice"),
])
def test_a_bad_config_file_stops_start_up_with_one_message(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run([sys.executable, str(ROOT / "pensieve.py"), "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


# --- Long start-up steps and models that cannot work ----------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_step_on_a_terminal_is_one_line_with_a_clock(monkeypatch):
    monkeypatch.setattr(progress, "REDRAW_S", 0.01)
    out = Terminal()
    with progress.step("loading a model", stream=out):
        time.sleep(0.1)
    text = out.getvalue()
    assert text.startswith("loading a model ...")
    assert "\rloading a model ... 0 s" in text  # redrawn in place while it runs
    assert text.endswith("\n") and text.count("\n") == 1
    assert re.search(r"\rloading a model \.\.\. done in \d+\.\d s\n$", text)


def test_a_step_in_a_log_says_start_progress_and_end(monkeypatch, caplog):
    monkeypatch.setattr(progress, "PROGRESS_LOG_S", 0.02)
    with caplog.at_level(logging.INFO, logger="pensieve.engine"):
        with pytest.raises(RuntimeError):
            with progress.step("importing x.gguf", stream=io.StringIO()):
                time.sleep(0.1)
                raise RuntimeError("disk full")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "importing x.gguf ..."
    assert any(line.startswith("importing x.gguf: still running") for line in lines)
    assert lines[-1].startswith("importing x.gguf: failed in ")


@pytest.mark.process
def test_a_model_too_large_for_memory_is_refused_before_loading(tiny_model_dir, tmp_path):
    from engine.models import physical_memory

    model = tmp_path / "huge-model"
    model.mkdir()
    shutil.copy(tiny_model_dir / "config.json", model / "config.json")
    with open(model / "model.safetensors", "wb") as f:  # sparse: takes no disk
        f.truncate(2 * physical_memory())
    out = subprocess.run([sys.executable, str(ROOT / "pensieve.py"), "--model", str(model),
                          "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PENSIEVE_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "huge-model needs" in out.stderr and "Pick a smaller model" in out.stderr
    assert "Traceback" not in out.stderr
