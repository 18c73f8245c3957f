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
from pathlib import Path

import anthropic
import pytest

from conftest import API_KEY

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

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from conftest import ROOT, PensieveProcess  # noqa: E402

import pensieve  # noqa: E402

CLAUDE = shutil.which("claude", path=str(ROOT / ".claude-cli" / "node_modules" / ".bin")) \
    or shutil.which("claude")
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


def run_claude(server, tmp_path, *args):
    env = {**os.environ, **pensieve.claude_env(pensieve.Config(port=server.port)),
           "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
           # The CLI gives up (exit 1) on answers past this cap; the prompts
           # here get short greedy answers, and the cap leaves room should the
           # date or folder in the CLI's prompt lengthen them.
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "1024"}
    # A fixed working directory: the CLI puts it in its prompt, and the greedy
    # answer should not depend on pytest's numbered temporary folders.
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
