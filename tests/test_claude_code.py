"""What the real Claude Code CLI sends, replayed against the real server, and
the real CLI driving the real server.

The bodies under tests/captures/claude-2.1.332/ were recorded from Claude Code
2.1.332 (the version make test pins) with tests/capture_claude.py: its main
request with no tools (--bare --tools ""), with Bash and Read, with its
default tool set (tool search on: a DeferredToolPlaceholder, tools announced
by name), in auto mode, the requests after a Bash round trip and a ToolSearch
round trip, and an interactive session in a terminal (its title request, a
JSON-schema answer; its two turns, thinking.display "updates", in auto mode).
The API-level tests replay them against the embedded model at its trained 8k
window; the CLI tests run the CLI in its default mode against the embedded
model as served by default (32k, RoPE scaled), on one shared server whose
prompt cache carries the ~12k-token default prefix from the first test to the
rest, so the long first read is paid once.
"""

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import anthropic
import pytest

import engine
import pensieve
from helpers import (API_KEY, FakeModel, PensieveProcess, ScriptedCalls, ServerThread,
                     claude_cli)

pytestmark = pytest.mark.process  # every test runs `python pensieve.py` or the claude CLI

CAPTURES = Path(__file__).parent / "captures" / "claude-2.1.332"
FITTING = ["bare-main", "tools-main", "bash-result",  # within the 8k window
           "interactive-title"]
DEFAULT_SET = ["default-main", "auto-main", "auto-after-bash", "toolsearch-result",
               "toolsearch-second-call", "interactive-main", "interactive-second-turn"]


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
    # 128000 on main requests (32000 on the title's)
    assert body["stream"] is True and body["max_tokens"] in (128000, 32000)
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
    # marked cache_control, as it does on its main requests.
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


@pytest.mark.parametrize("name", DEFAULT_SET)
def test_default_tool_set_is_counted_and_too_long_for_8k_with_exact_numbers(client, name):
    """Beyond the trained window the 400 carries Claude Code's exact wording,
    the one it compacts on; tool search's loaded definition is counted."""
    body = capture(name)["body"]
    assert any(t.get("defer_loading") for t in body["tools"])
    n = count(client, body)
    assert n > 8191
    if name.startswith("toolsearch"):
        assert n > count(client, capture("default-main")["body"]) + 200  # WebFetch's
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(**_sdk_args({**body, "stream": False, "max_tokens": 2}),
                               timeout=120)
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
    probe = capture("probe")
    assert (probe["method"], probe["path"]) == ("HEAD", "/api/hello")
    request = urllib.request.Request(real_server + "/api/hello", method="HEAD")
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200



# --- The real CLI against the real server ------------------------------------------

CLAUDE = claude_cli()
needs_cli = pytest.mark.skipif(CLAUDE is None, reason="Claude Code CLI not installed "
                               "(make test installs it with npm)")
SERVED = ("SmolLM2-135M-Instruct", 32768)  # the embedded model as served by default


@pytest.fixture(scope="module")
def greedy_server(cache_dir, smollm_dir):
    """The embedded model as `python pensieve.py` serves it, greedy when a
    request names no temperature (as Claude Code's never do), logging each
    answer's text."""
    server = PensieveProcess(cache_dir, "--default-temperature", "0", "--log-level",
                             "debug", name="claude-server")
    yield server
    server.stop()


def run_claude(server, tmp_path, *args, cwd=None, max_output=1024, served=SERVED,
               extra_env=None):
    """The CLI with the environment setup-claude-code writes: the served
    model's name and window. ``extra_env``: more variables (None: unset)."""
    env = {**os.environ, **pensieve.claude_env(pensieve.Config(port=server.port), served),
           "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
           # The CLI gives up (exit 1) on answers past this cap; the prompts
           # here get short greedy answers, and the cap leaves room should the
           # date or folder in the CLI's prompt lengthen them.
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output), **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    if cwd is None:
        # A fixed working directory: the CLI puts it in its prompt, and the
        # prompt (and the greedy answer) should not depend on pytest's
        # numbered temporary folders.
        cwd = Path("/tmp/pensieve-claude-e2e")
        cwd.mkdir(exist_ok=True)
    return subprocess.run([CLAUDE, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1800)


def answers(log):
    """The text of every answer the server logged, by request id."""
    return {rid: "".join(b.get("text", "") for b in json.loads(content)) for rid, content in
            re.findall(r"(req_\w+) content: (.*)", log)}


def finished_or_capped(out, cap):
    """The CLI's exit: 0, or 1 with its own message for an answer past the cap
    (a small model rambles)."""
    output = out.stdout + out.stderr
    assert out.returncode == 0 or (out.returncode == 1 and f"exceeded the {cap} output "
                                   "token maximum" in output), output


@needs_cli
def test_cli_prints_what_the_server_generated(greedy_server, tmp_path):
    out = run_claude(greedy_server, tmp_path, "-p", "What is the capital of France?",
                     "--bare", "--tools", "")
    assert out.returncode == 0, out.stdout + out.stderr
    generated = answers(greedy_server.log())
    assert out.stdout.strip() in [text.strip() for text in generated.values()]
    assert out.stdout.strip()
    # The requests named the served model, as the set-up told the CLI to.
    assert re.search(r"POST /v1/messages 200 .* model=SmolLM2-135M-Instruct ",
                     greedy_server.log())


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
    assert "class='main'" in log  # CLAUDE_CODE_GATEWAY_HINT_HEADERS labels requests


# --- The default mode, on one shared server; scripted calls the CLI runs ----------


def scripted_calls_server(model_dir, window):
    """The embedded model at ``window``, greedy, in-process so tests script
    calls (``server.wrapper``: ScriptedCalls) and see each request's cache hits."""
    wrapper = ScriptedCalls(engine.Engine(str(model_dir), context_window=window))
    server = ServerThread(pensieve.Config(host="127.0.0.1", port=0, model=str(model_dir),
                                          default_temperature=0.0), engine=wrapper).start()
    server.wrapper = wrapper
    return server


@pytest.fixture(scope="module")
def default_server(smollm_dir):
    """The embedded model at its default 32k window (YaRN)."""
    server = scripted_calls_server(smollm_dir, SERVED[1])
    yield server
    server.stop()


# At 12k tokens deep the 135M model loops rather than ending its turn, and
# decodes at ~2 tok/s here: its answers end at this cap, and the CLI, after
# its three "resume" requests, exits with its own cap message.
DEFAULT_CAP = 32
DEFAULT_PROMPT = "What is the capital of France?"
# After each capped answer the CLI would also compact the conversation (four
# summarising requests, minutes each here); these tests are about the default
# mode's requests, so its automatic compaction is off.
NO_AUTO_COMPACT = {"DISABLE_AUTO_COMPACT": "1"}


def new_requests(server, since):
    return server.wrapper.seen[since:]


@needs_cli
def test_cli_default_mode_answers_on_the_embedded_model(default_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pensieve")
    since = len(default_server.wrapper.seen)
    out = run_claude(default_server, tmp_path, "-p", DEFAULT_PROMPT, max_output=DEFAULT_CAP,
                     extra_env=NO_AUTO_COMPACT)
    finished_or_capped(out, DEFAULT_CAP)
    request, sent, done = new_requests(default_server, since)[0]
    # The default tool set (tool search on): the placeholder is never offered,
    # the deferred tools are announced by name only.
    names = [t.name for t in request.offered]
    assert "ToolSearch" in names and "DeferredToolPlaceholder" not in names
    assert "WebFetch" not in names
    assert isinstance(sent[0], engine.Accepted) and sent[0].input_tokens > 8192
    assert done is not None and done.stop_reason in ("end_turn", "max_tokens")
    assert "Traceback" not in caplog.text and "stream failed" not in caplog.text


@needs_cli
def test_cli_tool_search_round_trip(default_server, tmp_path, caplog):
    """The model calls ToolSearch; the CLI answers with a tool_reference; the
    next request is accepted, the deferred tool is callable (and under the
    grammar), and its prompt was read from the cache up to the new turn."""
    caplog.set_level(logging.INFO, logger="pensieve")
    since = len(default_server.wrapper.seen)
    default_server.wrapper.calls = [("ToolSearch", {"query": "select:WebFetch"})]
    out = run_claude(default_server, tmp_path, "-p", "Fetch example.com for me.",
                     max_output=DEFAULT_CAP,
                     extra_env=NO_AUTO_COMPACT)
    finished_or_capped(out, DEFAULT_CAP)
    seen = new_requests(default_server, since)
    first, second = seen[0], seen[1]
    assert [type(m) for m in first[1]][:2] == [engine.Accepted, engine.ToolCallStart]
    result = next(m for m in second[0].messages if m.role == "tool")
    assert [t.name for t in result.tools] == ["WebFetch"]  # rendered where loaded
    assert "WebFetch" in {t.name for t in second[0].offered}
    assert "WebFetch" not in {t.name for t in second[0].tools}  # not at the start
    accepted = second[1][0]
    assert isinstance(accepted, engine.Accepted) and accepted.constrained
    assert second[2] is not None  # answered to the end
    # Turn 2 read turn 1's prompt from the cache: all but what is new.
    assert second[2].cached_tokens >= first[1][0].input_tokens - 1
    assert "Traceback" not in caplog.text and "stream failed" not in caplog.text


@needs_cli
def test_cli_default_mode_runs_a_scripted_bash_call(default_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="pensieve")
    work = tmp_path / "work"
    work.mkdir()
    (work / "pensieve-marker.txt").write_text("marker\n")
    since = len(default_server.wrapper.seen)
    default_server.wrapper.calls = [("Bash", {"command": "ls", "description": "List"})]
    out = run_claude(default_server, tmp_path, "-p", "List the files here.",
                     "--tools", "Bash,Read", "--allowedTools", "Bash,Read", cwd=work,
                     max_output=DEFAULT_CAP,
                     extra_env=NO_AUTO_COMPACT)
    finished_or_capped(out, DEFAULT_CAP)
    seen = new_requests(default_server, since)
    given = [b["id"] for content in re.findall(r"req_\w+ content: (.*)", caplog.text)
             for b in json.loads(content) if b["type"] == "tool_use"]
    assert len(given) == 1 and given[0].startswith("toolu_")
    request, sent, done = next(e for e in seen if any(m.role == "tool" for m in e[0].messages))
    result = next(m for m in request.messages if m.role == "tool")
    assert result.call_id == given[0] and result.name == "Bash" and not result.is_error
    assert "pensieve-marker.txt" in result.text
    # The real model answered it, the stream ran to its end, from the cache.
    assert isinstance(sent[0], engine.Accepted) and isinstance(sent[-1], engine.Finished)
    assert all(isinstance(m, pensieve.CONTENT_EVENTS) for m in sent[1:-1])
    assert done.cached_tokens >= seen[0][1][0].input_tokens - 1
    assert "stream failed" not in caplog.text and "Traceback" not in caplog.text


# --- Compaction: when the session outgrows the window --------------------------------

# Claude Code's default request, in the embedded model's tokens (2.1.332).
DEFAULT_PROMPT_TOKENS = 12_200
COMPACT_WINDOW = 4096


def last_user_text(request):
    said = [m.text for m in request.messages if m.role in ("user", "tool")]
    return said[-1] if said else ""


def compacting(request):
    """Whether this is the CLI's summarising request (by its last user text)."""
    return last_user_text(request).startswith(
        "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools.")


@needs_cli
def test_setup_leaves_a_default_mode_session_room_to_grow(scripted, tmp_path):
    """Claude Code compacts once a session passes the window less its output
    reservation less a 13k summary buffer. Its default prompt is ~12k of the
    embedded model's tokens: at 32k, with the CLI's own reservation (20k), it
    would compact before every turn after the first; with the set-up's it
    does not. The engine is scripted to report the real model's prompt size."""
    def script(request):
        if isinstance(request, engine.CountRequest):
            return [engine.Counted(DEFAULT_PROMPT_TOKENS)]
        return [engine.Accepted(DEFAULT_PROMPT_TOKENS, request.max_tokens),
                engine.TextDelta("Done."),
                engine.Finished("end_turn", None, DEFAULT_PROMPT_TOKENS, 2, 0.0, 0.0)]

    server = scripted(script, model=FakeModel(*SERVED))

    def compactions(output_cap):
        since = len(server.engine.jobs)
        for prompt, more in (("Say hi.", ()), ("Say hi again.", ("--continue",))):
            out = run_claude(server, tmp_path / str(output_cap), "-p", prompt, *more,
                             extra_env={"CLAUDE_CODE_MAX_OUTPUT_TOKENS": output_cap})
            if output_cap is not None:
                assert out.returncode == 0 and out.stdout.strip() == "Done.", out.stderr
        return [job for job in server.engine.jobs[since:] if compacting(job.request)]

    setup_cap = pensieve.claude_env(pensieve.Config(), SERVED)["CLAUDE_CODE_MAX_OUTPUT_TOKENS"]
    assert setup_cap == str(pensieve.claude_output_cap(SERVED[1])) == "4096"
    assert compactions(setup_cap) == []
    assert compactions(None)  # the CLI's own reservation: it summarises at once


@pytest.fixture(scope="module")
def small_server(smollm_dir):
    """The embedded model at a 4k window: a session outgrows it in two rounds."""
    server = scripted_calls_server(smollm_dir, COMPACT_WINDOW)
    yield server
    server.stop()


@needs_cli
def test_cli_compacts_a_session_that_outgrows_the_window(small_server, tmp_path, caplog):
    """Two Bash rounds of numbers: the CLI reckons ~1 token a line, SmolLM2
    reads a digit a token, so the second round's request passes the server's
    window while the CLI (told the default 32k window, as after a set-up
    against the default server) still thinks it fits. The server's exact 400
    is what tells it: the CLI summarises (its summarising request, too long
    itself, is cut down on a second 400), resends the session as the summary,
    and goes on to its answer."""
    caplog.set_level(logging.INFO, logger="pensieve")
    wrapper = small_server.wrapper
    since = len(wrapper.seen)
    summary = ("<analysis>The user counted with seq.</analysis>\n<summary>\n"
               "1. Primary Request: count to 1100 with seq.\n2. Pending Tasks: none.\n"
               "</summary>")
    wrapper.calls = [("Bash", {"command": "seq 1 700", "description": "Count"}),
                     ("Bash", {"command": "seq 701 1100", "description": "Count on"}),
                     (None, summary, compacting),
                     (None, "Counted to 1100.", lambda request: not compacting(request))]
    debug = tmp_path / "claude-debug.log"
    out = run_claude(small_server, tmp_path, "-p", "Count to 1100 with seq.", "--bare",
                     "--tools", "Bash", "--allowedTools", "Bash", "--debug-file", str(debug),
                     max_output=DEFAULT_CAP)
    assert out.returncode == 0 and out.stdout.strip() == "Counted to 1100.", \
        out.stdout + out.stderr
    assert wrapper.calls == []  # every scripted turn was asked for
    seen = new_requests(small_server, since)
    refused = [(request, sent[0]) for request, sent, _ in seen
               if isinstance(sent[0], engine.Failed)]
    # The main request after the second round: refused with the exact
    # wording, and the CLI got it as sent.
    request, failed = refused[0]
    assert request.messages[-1].role == "tool" and request.messages[-1].text.startswith("701")
    n = int(re.fullmatch(r"prompt is too long: (\d+) tokens > 4095 maximum",
                         failed.message).group(1))
    assert n > COMPACT_WINDOW and failed.message in debug.read_text()
    # Then the summarising request, accepted once it fits, answered.
    summarised = [(request, sent) for request, sent, done in seen
                  if compacting(request) and isinstance(sent[0], engine.Accepted)]
    assert len(summarised) == 1 and summarised[0][1][0].input_tokens < COMPACT_WINDOW
    assert "class='compaction'" in caplog.text
    # The session goes on from the summary, accepted and answered.
    request, sent, done = seen[-1]
    first = next(m.text for m in request.messages if m.role == "user")
    assert first.startswith("This session is being continued from a previous conversation")
    assert "count to 1100 with seq" in first
    assert isinstance(sent[0], engine.Accepted) and done is not None
    assert "Traceback" not in caplog.text and "stream failed" not in caplog.text
    health = json.load(urllib.request.urlopen(small_server.url + "/health", timeout=10))
    assert health["status"] == "healthy"


# --- Auto mode: the server's verdicts, as the CLI takes them -------------------------


@pytest.fixture(scope="module")
def auto_server(smollm_dir):
    """The embedded model at its trained window, its calls scripted."""
    server = scripted_calls_server(smollm_dir, 8192)
    yield server
    server.stop()


def run_auto(server, tmp_path, command, home):
    """The CLI in auto mode (``--bare`` with Bash only, for speed), one
    scripted Bash call, its events as JSON lines, its own debug log."""
    wrapper = server.wrapper
    wrapper.calls = [("Bash", {"command": command, "description": "As asked"}),
                     (None, "Done.", lambda request: last_user_text(request) != "Go.")]
    since = len(wrapper.seen)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    debug = tmp_path / "claude-debug.log"
    out = run_claude(server, tmp_path, "-p", "Go.", "--bare", "--tools", "Bash",
                     "--permission-mode", "auto", "--output-format", "stream-json",
                     "--verbose", "--debug-file", str(debug), cwd=work,
                     served=("SmolLM2-135M-Instruct", 8192), extra_env={"HOME": str(home)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert wrapper.calls == [], out.stdout  # the call was made and the turn ended
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return events, new_requests(server, since), debug.read_text(), out


def tool_results(events):
    return [block for event in events if event.get("type") == "user"
            for block in event["message"]["content"] if block.get("type") == "tool_result"]


def result_text(block):
    content = block["content"]
    return content if isinstance(content, str) else "".join(
        part.get("text", "") for part in content)


def no_fallback(out, debug, seen):
    """The CLI took the server's verdicts: no notice that the session is not
    eligible, and no classifier request of its own reached the server."""
    for text in (out.stdout, out.stderr, debug):
        assert "isn't eligible" not in text and "server_no_result" not in text
    assert not [request for request, _, _ in seen if "</block>" in request.stop_sequences]


@needs_cli
def test_auto_mode_runs_a_call_the_server_passes(auto_server, tmp_path, caplog):
    """A write to scratch space outside the working directory: the CLI does
    not decide it by itself, and has no classifier of its own here (the
    set-up turns non-essential traffic off), so it runs on the server's word."""
    caplog.set_level(logging.INFO, logger="pensieve.access")
    scratch = Path(tempfile.mkdtemp(dir="/tmp"))
    marker = scratch / "marker.txt"
    try:
        events, seen, debug, out = run_auto(auto_server, tmp_path,
                                            f"echo checked > {marker}", tmp_path / "home")
        assert marker.read_text() == "checked\n"
    finally:
        shutil.rmtree(scratch)
    no_fallback(out, debug, seen)
    checked = [r.fields["verdicts"] for r in caplog.records
               if r.name == "pensieve.access" and "verdicts" in r.fields]
    assert {"not_flagged/policy": 1} in checked  # the call, judged here


@needs_cli
def test_auto_mode_stops_a_call_the_server_flags(auto_server, tmp_path, caplog):
    """A delete outside the working directory (in the user's home): flagged;
    the CLI does not run it and shows the model (and the user) why."""
    caplog.set_level(logging.INFO, logger="pensieve.access")
    home = tmp_path / "home"
    victim = home / "projects"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("keep me")
    events, seen, debug, out = run_auto(auto_server, tmp_path, f"rm -rf {victim}", home)
    assert (victim / "notes.txt").read_text() == "keep me"
    no_fallback(out, debug, seen)
    [result] = tool_results(events)
    assert result.get("is_error") is True
    reason = f"deletes {victim}, outside the working directories"
    assert reason in result_text(result)
    # The model reads the explanation in the next request.
    assert any(reason in message.text for request, _, _ in seen
               for message in request.messages if message.role == "tool")


@needs_cli
def test_client_mode_leaves_the_check_to_the_cli_classifier(scripted, tmp_path):
    """--auto-mode-check client: the replies carry no verdicts, and the CLI
    (its own classifier on, as the set-up leaves it in this mode) sends its
    classifier request; the call runs on that classifier's "no block". The
    classifier's answer is scripted: its ~35k-token prompt needs a model with
    a window that large."""
    marker = tmp_path / "ran.txt"  # outside the working directory: it needs a check
    work = tmp_path / "work"

    def script(request):
        if not isinstance(request, engine.GenerationRequest):
            return [engine.Counted(100)]
        if "</block>" in request.stop_sequences:
            answer, stop = [engine.TextDelta("<block>no")], "stop_sequence"
        elif request.messages[-1].role != "tool" and request.offered:
            arguments = {"command": f"touch {marker}", "description": "As asked"}
            answer, stop = [engine.ToolCallStart("Bash"),
                            engine.ToolInputDelta(json.dumps(arguments)),
                            engine.ToolCallEnd(arguments)], "tool_use"
        else:
            answer, stop = [engine.TextDelta("Done.")], "end_turn"
        return [engine.Accepted(100, request.max_tokens), *answer,
                engine.Finished(stop, "</block>" if stop == "stop_sequence" else None,
                                100, 2, 0.0, 0.0)]

    server = scripted(script, model=FakeModel(*SERVED), auto_mode_check="client")
    client_env = pensieve.claude_env(pensieve.Config(port=server.port,
                                                     auto_mode_check="client"))
    assert client_env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == ""
    work.mkdir()
    out = run_claude(server, tmp_path, "-p", "Go.", "--bare", "--tools", "Bash",
                     "--permission-mode", "auto", cwd=work,
                     extra_env={"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": ""})
    assert out.returncode == 0 and out.stdout.strip() == "Done.", out.stdout + out.stderr
    assert marker.exists()
    classifier = [job.request for job in server.engine.jobs
                  if isinstance(job.request, engine.GenerationRequest)
                  and "</block>" in job.request.stop_sequences]
    assert len(classifier) == 1
    assert len(classifier[0].messages[0].text) > 100_000  # its own policy prompt
