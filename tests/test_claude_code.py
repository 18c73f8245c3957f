"""What the real Claude Code CLI sends, replayed against the real server.

The bodies under tests/captures/ were recorded from Claude Code 2.1.197 with
tests/capture_claude.py: its session-title request, its main request with no
tools (--bare --tools ""), with Bash and Read, and with the full tool set. The
real SmolLM2 server must accept each one, count its tokens exactly as
generation does, drop the per-request billing line, and refuse the full-tool
request (beyond the 8k window) with Anthropic's exact wording.
"""

import copy
import json
import logging
import os
import re
import subprocess
import threading
from pathlib import Path

import anthropic
import pytest

import engine
import pensieve
from conftest import API_KEY, FakeJob, PensieveProcess, ServerThread, claude_cli

CAPTURES = Path(__file__).parent / "captures" / "claude-2.1.197"
FITTING = ["bare-title", "bare-main", "tools-main"]


def capture(name):
    return json.loads((CAPTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def client(real_server):
    return anthropic.Anthropic(base_url=real_server, api_key=API_KEY, max_retries=0)


def post(client, path, body):
    """POST a raw captured body (the SDK would re-validate its fields)."""
    return client.post(path, body=body, cast_to=object,
                       options={"headers": {"anthropic-beta": "claude-code-20250219"}})


def count(client, body):
    return post(client, "/v1/messages/count_tokens?beta=true", body)["input_tokens"]


@pytest.mark.parametrize("name", FITTING)
def test_captured_request_streams_and_counts_agree(client, name):
    body = capture(name)["body"]
    assert body["stream"] is True and body["max_tokens"] == 64000
    short = {**body, "max_tokens": 2}  # everything else exactly as the CLI sent it
    with client.messages.with_streaming_response.create(**_sdk_args(short)) as response:
        events = [line for line in response.iter_lines() if line.startswith("event: ")]
        assert response.http_response.status_code == 200
    assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    started = client.messages.create(**_sdk_args({**short, "stream": False}),
                                     timeout=120)
    assert started.model == body["model"]
    # The three input counts add up to the prompt, as Claude Code sums them to
    # track its context window. Most came from the prompt cache (the stream
    # above left them there); what was read is cache creation where the CLI
    # marked cache_control (the main request), plain input where not (title).
    used = started.usage
    assert count(client, body) == (used.input_tokens + used.cache_read_input_tokens
                                   + used.cache_creation_input_tokens)
    read = used.input_tokens + used.cache_creation_input_tokens
    assert used.cache_read_input_tokens > read > 0
    marked = "cache_control" in json.dumps(body)
    assert (used.cache_creation_input_tokens, used.input_tokens) == \
        ((read, 0) if marked else (0, read))


def _sdk_args(body):
    """The captured body as SDK arguments, unknown fields passed through."""
    known = {"model", "messages", "max_tokens", "stream", "system", "tools",
             "metadata", "thinking", "output_config", "stop_sequences", "tool_choice"}
    args = {k: v for k, v in body.items() if k in known}
    args["extra_body"] = {k: v for k, v in body.items() if k not in known}
    return args


def test_full_tool_set_is_too_long_with_exact_numbers(client):
    body = capture("full-main")["body"]
    assert len(body["tools"]) == 25
    assert [m["role"] for m in body["messages"]] == ["user", "system"]  # inline note
    n = count(client, body)
    assert n > 8191
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**_sdk_args({**body, "stream": False}), timeout=120)
    assert info.value.body["error"]["message"] == f"prompt is too long: {n} tokens > 8191 maximum"


def test_billing_line_does_not_reach_the_prompt(client):
    body = capture("bare-main")["body"]
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
    changed = copy.deepcopy(body)
    changed["system"][0]["text"] = "x-anthropic-billing-header: cc_version=9.9.9; cch=abcdef;"
    without = copy.deepcopy(body)
    del without["system"][0]
    assert count(client, body) == count(client, changed) == count(client, without)


def test_count_tokens_needs_no_max_tokens_and_validates(client):
    body = {"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "hi"}]}
    assert count(client, body) > 1
    with pytest.raises(anthropic.BadRequestError) as info:
        post(client, "/v1/messages/count_tokens", {"model": "m", "messages": "hi"})
    assert "messages" in info.value.body["error"]["message"]


def test_probe_is_answered(real_server):
    import urllib.request

    probe = capture("probe")
    assert (probe["method"], probe["path"]) == ("HEAD", "/")
    request = urllib.request.Request(real_server + "/", method="HEAD")
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200


# --- The real CLI against the real server ------------------------------------------

CLAUDE = claude_cli()
needs_cli = pytest.mark.skipif(CLAUDE is None, reason="Claude Code CLI not installed "
                               "(make test installs it with npm)")


@pytest.fixture(scope="module")
def greedy_server(cache_dir, smollm_dir):
    """The embedded model, greedy when a request names no temperature (as
    Claude Code's never do), logging each answer's text."""
    server = PensieveProcess(cache_dir, "--default-temperature", "0", "--log-level",
                             "debug", name="claude-server")
    yield server
    server.stop()


def run_claude(server, tmp_path, *args, cwd=None, max_output=1024):
    env = {**os.environ, **pensieve.claude_env(pensieve.Config(port=server.port)),
           "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
           # The CLI gives up (exit 1) on answers past this cap; the prompts
           # here get short greedy answers, and the cap leaves room should the
           # date or folder in the CLI's prompt lengthen them.
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)}
    if cwd is None:
        # A fixed working directory: the CLI puts it in its prompt, and the
        # greedy answer should not depend on pytest's numbered temporary folders.
        cwd = Path("/tmp/pensieve-claude-e2e")
        cwd.mkdir(exist_ok=True)
    return subprocess.run([CLAUDE, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)


def answers(log):
    """The text of every answer the server logged, by request id."""
    return {rid: "".join(b.get("text", "") for b in json.loads(content)) for rid, content in
            re.findall(r"(req_\w+) content: (.*)", log)}


@needs_cli
def test_cli_prints_what_the_server_generated(greedy_server, tmp_path):
    out = run_claude(greedy_server, tmp_path, "-p", "What is the capital of France?",
                     "--bare", "--tools", "")
    assert out.returncode == 0, out.stdout + out.stderr
    generated = answers(greedy_server.log())
    assert out.stdout.strip() in [text.strip() for text in generated.values()]
    assert out.stdout.strip()


@needs_cli
def test_cli_with_tools(greedy_server, tmp_path):
    before = set(answers(greedy_server.log()))
    out = run_claude(greedy_server, tmp_path, "-p", "What is 2+2?", "--bare",
                     "--tools", "Bash,Read", "--allowedTools", "Bash,Read")
    assert out.returncode == 0, out.stdout + out.stderr
    log = greedy_server.log()
    new = set(answers(log)) - before
    assert new  # every request was answered to the end (its text is logged)
    assert "stream failed" not in log and "Traceback" not in log
    assert re.search(r"tools: \['Bash', 'Read'\]", log)  # definitions reached the prompt


@needs_cli
def test_cli_full_tool_set_is_too_long(greedy_server, tmp_path):
    out = run_claude(greedy_server, tmp_path, "-p", "hi")
    assert out.returncode != 0
    assert "Prompt is too long" in out.stdout + out.stderr
    assert re.search(r"prompt is too long: \d+ tokens > 8191 maximum", greedy_server.log())
    with urlopen(greedy_server.url + "/health") as r:
        assert json.load(r)["status"] == "healthy"


def urlopen(url):
    import urllib.request

    return urllib.request.urlopen(url, timeout=30)


# --- A tool round trip: the CLI runs our tool_use, the real model reads the result ---


class BashFirstEngine:
    """The real engine, except that a request offering tools whose conversation
    holds no tool result yet is answered with one scripted call, Bash ``ls``:
    the embedded 135M model never decides to call a tool by itself. Records
    every GenerationRequest with the messages delivered for it."""

    CALL = [engine.ToolCallStart("Bash"), engine.ToolInputDelta('{"command"'),
            engine.ToolInputDelta(': "ls'), engine.ToolInputDelta('"}'),
            engine.ToolCallEnd({"command": "ls"})]

    def __init__(self, real):
        self.real = real
        self.seen = []  # (GenerationRequest, [messages delivered for it])

    def __getattr__(self, name):  # start, wait_loaded, stop, stats, model, ...
        return getattr(self.real, name)

    def submit(self, request, deliver):
        if not isinstance(request, engine.GenerationRequest):
            return self.real.submit(request, deliver)  # token counts
        sent = []
        self.seen.append((request, sent))

        def record(msg):
            sent.append(msg)
            deliver(msg)

        if not request.tools or any(m.role == "tool" for m in request.messages):
            return self.real.submit(request, record)
        job = FakeJob(request)
        script = [engine.Accepted(1000, request.max_tokens), *self.CALL,
                  engine.Finished("tool_use", None, 1000, 12, 0.01, 10.0)]
        threading.Thread(target=lambda: [record(m) for m in script], daemon=True).start()
        return job


@needs_cli
def test_cli_runs_our_tool_call_and_the_model_answers_its_result(smollm_dir, tmp_path,
                                                                 caplog):
    caplog.set_level(logging.DEBUG, logger="pensieve")
    wrapper = BashFirstEngine(engine.Engine(str(smollm_dir)))
    server = ServerThread(pensieve.Config(host="127.0.0.1", port=0, model=str(smollm_dir),
                                          default_temperature=0.0), engine=wrapper).start()
    work = tmp_path / "work"
    work.mkdir()
    (work / "pensieve-marker.txt").write_text("marker\n")
    try:
        out = run_claude(server, tmp_path, "-p", "List the files here.", "--bare",
                         "--tools", "Bash,Read", "--allowedTools", "Bash,Read",
                         cwd=work, max_output=64)
    finally:
        server.stop()
    output = out.stdout + out.stderr
    assert out.returncode == 0 or (out.returncode == 1 and "exceeded the 64 output "
                                   "token maximum" in output), output
    # The CLI took our streamed call, ran ls here and sent its output back,
    # answering the id the server gave the call.
    given = [b["id"] for content in re.findall(r"req_\w+ content: (.*)", caplog.text)
             for b in json.loads(content) if b["type"] == "tool_use"]
    assert len(given) == 1 and given[0].startswith("toolu_")
    answered = [(r, sent) for r, sent in wrapper.seen
                if any(m.role == "tool" for m in r.messages)]
    assert answered, [r.messages for r, _ in wrapper.seen]
    request, sent = answered[-1]
    call = next(m for m in request.messages if m.role == "assistant" and m.calls)
    assert call.calls == ((given[0], "Bash", {"command": "ls"}),)
    result = next(m for m in request.messages if m.role == "tool")
    assert result.call_id == given[0] and result.name == "Bash" and not result.is_error
    assert "pensieve-marker.txt" in result.text
    # The real model answered it, and the stream ran to its end.
    assert isinstance(sent[0], engine.Accepted) and isinstance(sent[-1], engine.Finished)
    assert all(isinstance(m, pensieve.CONTENT_EVENTS) for m in sent[1:-1])
    assert "stream failed" not in caplog.text and "Traceback" not in caplog.text
    if out.returncode == 0:
        text = "".join(m.text for m in sent if isinstance(m, engine.TextDelta))
        assert out.stdout.strip() == text.strip()
