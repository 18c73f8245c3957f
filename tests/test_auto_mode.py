"""Auto mode's safety check over HTTP: a request's ``safeguards`` answered
with ``safeguard_results`` for exactly the reply's tool calls, streamed (in
the final message_delta) and not (at the top of the message).

Protocol and fault cases run on a scripted engine, which makes the calls a
test needs (parallel ones, a delete outside the project); the shape of real
replies and the served model's own verdicts (``--auto-mode-check model``)
run on the embedded SmolLM2. The judge itself: tests/test_safeguards.py;
the real CLI: tests/test_claude_code.py.
"""

import copy
import json
import logging
import urllib.request
from pathlib import Path

import anthropic
import pytest
from prometheus_client.parser import text_string_to_metric_families

import engine
import pensieve
from helpers import API_KEY, ScriptedCalls, ServerThread, wait_until
from engine import Accepted, Finished, GenerationRequest, TextDelta, ToolCallEnd, \
    ToolCallStart, ToolInputDelta

CAPTURE = Path(__file__).parent / "captures" / "claude-2.1.332" / "auto-main.json"
# What Claude Code 2.1.332 sent in auto mode; its working directory is /tmp/work.
SAFEGUARDS = json.loads(CAPTURE.read_text())["body"]["safeguards"]
BASH = {"name": "Bash", "description": "Run a shell command.",
        "input_schema": {"type": "object", "properties": {
            "command": {"type": "string", "maxLength": 60}},
            "required": ["command"], "additionalProperties": False}}
SAFE_CALL = ("Bash", {"command": "ls -la"})
RISKY_CALL = ("Bash", {"command": "rm -rf /root/projects"})


def body(stream=False, safeguards=SAFEGUARDS, **extra):
    out = {"model": "claude-opus-5-5", "max_tokens": 40, "stream": stream,
           "tools": [BASH], "messages": [{"role": "user", "content": "List the files."}],
           **extra}
    if safeguards is not None:
        out["safeguards"] = safeguards
    return out


def post(url, payload):
    """(status, parsed JSON, or the SSE events as (name, data) pairs)."""
    request = urllib.request.Request(
        url + "/v1/messages", json.dumps(payload).encode(),
        {"content-type": "application/json", "x-api-key": API_KEY})
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            raw, status = reply.read().decode(), reply.status
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    if not payload.get("stream"):
        return status, json.loads(raw)
    events = []
    for chunk in raw.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return status, events


def replied(status, answer):
    """(tool_use blocks, safeguard_results or None) of a reply, either form."""
    assert status == 200, answer
    if isinstance(answer, dict):
        return [b for b in answer["content"] if b["type"] == "tool_use"], \
            answer.get("safeguard_results")
    calls = [data["content_block"] for name, data in answer
             if name == "content_block_start" and data["content_block"]["type"] == "tool_use"]
    final = [data for name, data in answer if name == "message_delta"]
    assert len(final) == 1
    return calls, final[0]["delta"].get("safeguard_results")


def verdicts(results):
    """The one dangerous_tool_use result's verdicts, checked for shape."""
    assert isinstance(results, list) and len(results) == 1
    assert results[0]["type"] == "dangerous_tool_use"
    status = results[0]["status"]
    assert status["type"] == "available"
    for verdict in status["tool_uses"].values():
        assert verdict["type"] == "evaluated"
        assert verdict["outcome"] in ("flagged", "not_flagged")
        if verdict["outcome"] == "flagged":
            assert verdict["explanation"].strip()
    return status["tool_uses"]


def calling(*calls, text="Sure."):
    """A script answering with ``text`` and then ``calls``."""
    def script(request):
        out = [Accepted(5, request.max_tokens)] + ([TextDelta(text)] if text else [])
        for name, arguments in calls:
            out += [ToolCallStart(name), ToolInputDelta(json.dumps(arguments)),
                    ToolCallEnd(arguments)]
        return out + [Finished("tool_use" if calls else "end_turn", None, 5, 4, 0.0, 0.0)]
    return script


# --- The protocol, on a scripted engine -----------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_calls_each_get_a_verdict_keyed_by_their_id(scripted, stream):
    srv = scripted(calling(SAFE_CALL, RISKY_CALL))
    calls, results = replied(*post(srv.url, body(stream)))
    tool_uses = verdicts(results)
    assert list(tool_uses) == [c["id"] for c in calls] and len(calls) == 2
    assert tool_uses[calls[0]["id"]] == {"type": "evaluated", "outcome": "not_flagged"}
    flagged = tool_uses[calls[1]["id"]]
    assert flagged["outcome"] == "flagged"
    assert "/root/projects" in flagged["explanation"]
    assert "outside the working directories" in flagged["explanation"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_only_reply_carries_empty_verdicts(scripted, stream):
    srv = scripted(calling(text="Nothing to run."))
    calls, results = replied(*post(srv.url, body(stream)))
    assert calls == [] and verdicts(results) == {}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_safeguards_gets_no_results(scripted, stream):
    srv = scripted(calling(RISKY_CALL))
    calls, results = replied(*post(srv.url, body(stream, safeguards=None)))
    assert len(calls) == 1 and results is None


def test_a_rule_decided_verdict_cites_its_rule(scripted):
    safeguards = copy.deepcopy(SAFEGUARDS)
    safeguards[0]["classifier_context"]["rules"]["deny"] = [
        {"rule": "Bash(ls:*)", "source": "userSettings", "root": "/root/.claude"}]
    srv = scripted(calling(SAFE_CALL))
    calls, results = replied(*post(srv.url, body(safeguards=safeguards)))
    verdict = verdicts(results)[calls[0]["id"]]
    assert verdict["outcome"] == "flagged"
    assert verdict["cited_rule"] == {"type": "classifier_context", "path": "rules.deny.0"}
    assert "`Bash(ls:*)`" in verdict["explanation"]


def test_other_safeguards_are_answered_as_unsupported(scripted):
    srv = scripted(calling(SAFE_CALL))
    safeguards = SAFEGUARDS + [{"type": "some_future_check"}]
    _, results = replied(*post(srv.url, body(safeguards=safeguards)))
    assert results[1] == {"type": "some_future_check", "status": {"type": "unsupported"}}
    verdicts(results[:1])


@pytest.mark.parametrize("safeguards, field", [
    ({"type": "dangerous_tool_use"}, "safeguards"),
    (["dangerous_tool_use"], "safeguards.0"),
    ([{"type": "dangerous_tool_use", "classifier_context": "cwd=/"}],
     "safeguards.0.classifier_context"),
])
def test_malformed_safeguards_are_a_400_naming_the_field(scripted, safeguards, field):
    srv = scripted(calling(SAFE_CALL))
    status, answer = post(srv.url, body(safeguards=safeguards))
    assert status == 400 and answer["type"] == "error"
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"].startswith(field + ":")


@pytest.mark.parametrize("stream", [False, True])
def test_client_mode_declines_the_check(scripted, caplog, stream):
    """No results at all: Claude Code's own classifier judges the session's
    calls (tests/test_claude_code.py shows it doing so)."""
    srv = scripted(calling(SAFE_CALL, RISKY_CALL), auto_mode_check="client")
    with caplog.at_level(logging.INFO, logger="pensieve.access"):
        calls, results = replied(*post(srv.url, body(stream)))
        wait_until(lambda: [r for r in caplog.records if r.name == "pensieve.access"])
    assert len(calls) == 2 and results is None
    [record] = [r for r in caplog.records if r.name == "pensieve.access"]
    assert record.fields["verdicts"] == {"declined/client": 2}


def test_verdicts_are_counted_in_the_metrics_and_the_access_log(scripted, caplog):
    srv = scripted(calling(SAFE_CALL, RISKY_CALL, ("Bash", {"command": "frobnicate"})))
    with caplog.at_level(logging.INFO, logger="pensieve.access"):
        replied(*post(srv.url, body()))
        replied(*post(srv.url, body(safeguards=None)))
        wait_until(lambda: len([r for r in caplog.records
                                if r.name == "pensieve.access"]) == 2)
    with urllib.request.urlopen(srv.url + "/metrics") as reply:
        families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    counts = {(s.labels["outcome"], s.labels["by"]): s.value
              for s in families["pensieve_auto_mode_verdicts"].samples}
    assert counts == {("not_flagged", "policy"): 1, ("flagged", "policy"): 1,
                      ("flagged", "default"): 1}
    records = [r for r in caplog.records if r.name == "pensieve.access"]
    assert records[0].fields["verdicts"] == {"flagged/default": 1, "flagged/policy": 1,
                                             "not_flagged/policy": 1}
    assert "verdicts=flagged/default:1,flagged/policy:1,not_flagged/policy:1 check_ms=" \
        in records[0].getMessage()
    assert 0 < records[0].fields["check_ms"] < records[0].fields["ms"]
    assert "verdicts" not in records[1].fields


# --- The embedded model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(real_server):
    return anthropic.Anthropic(base_url=real_server, api_key=API_KEY, max_retries=0,
                               timeout=600)


def forced(client, stream, safeguards=SAFEGUARDS):
    """A forced Bash call of the real model, as (tool_use blocks, results, usage)."""
    extra = {"temperature": 0.0, **({} if safeguards is None else {"safeguards": safeguards})}
    kwargs = dict(model="claude-opus-5-5", max_tokens=60, tools=[BASH],
                  tool_choice={"type": "tool", "name": "Bash"}, extra_body=extra,
                  messages=[{"role": "user", "content": "List the files here."}])
    if not stream:
        message = client.messages.create(**kwargs)
        return ([b.model_dump() for b in message.content if b.type == "tool_use"],
                getattr(message, "safeguard_results", None), message.usage.model_dump())
    calls, final = [], None
    with client.messages.create(stream=True, **kwargs) as events:
        for event in events:
            if event.type == "content_block_start" and event.content_block.type == "tool_use":
                calls.append(event.content_block.model_dump())
            if event.type == "message_delta":
                final = event
    return (calls, getattr(final.delta, "safeguard_results", None),
            final.usage.model_dump())


@pytest.mark.parametrize("stream", [False, True])
def test_real_replies_carry_verdicts_for_exactly_their_calls(client, stream):
    calls, results, used = forced(client, stream)
    assert len(calls) >= 1
    assert sorted(verdicts(results)) == sorted(c["id"] for c in calls)
    # The check adds nothing to what the reply reports having read and written
    # (the second read may come from the prompt cache).
    plain_calls, none, plain_used = forced(client, stream, safeguards=None)
    assert none is None and prompt(plain_used) == prompt(used)
    assert plain_used["output_tokens"] == used["output_tokens"]


def prompt(used):
    return used["input_tokens"] + used["cache_read_input_tokens"] \
        + used["cache_creation_input_tokens"]


def test_a_real_text_reply_carries_empty_verdicts(client):
    message = client.messages.create(
        model="claude-opus-5-5", max_tokens=12,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"temperature": 0.0, "safeguards": SAFEGUARDS})
    assert all(b.type == "text" for b in message.content)
    assert verdicts(message.safeguard_results) == {}


@pytest.fixture(scope="module")
def model_checked(smollm_dir):
    """The embedded model judging what the rules leave open; its calls scripted."""
    wrapper = ScriptedCalls(engine.Engine(str(smollm_dir), context_window=8192))
    server = ServerThread(pensieve.Config(host="127.0.0.1", port=0, model=str(smollm_dir),
                                          auto_mode_check="model"), engine=wrapper).start()
    server.wrapper = wrapper
    yield server
    server.stop()


def test_model_mode_asks_the_served_model_for_what_the_rules_leave_open(model_checked):
    wrapper = model_checked.wrapper
    wrapper.calls = [("Bash", {"command": "frobnicate --all"}), SAFE_CALL]
    since = len(wrapper.seen)
    given = []
    for stream in (False, True):
        calls, results = replied(*post(model_checked.url, body(stream)))
        tool_uses = verdicts(results)
        assert list(tool_uses) == [calls[0]["id"]]
        given.append(tool_uses[calls[0]["id"]])
    assert given[1] == {"type": "evaluated", "outcome": "not_flagged"}
    checks = [entry for entry in wrapper.seen[since:] if entry[0].answer_schema is not None]
    # Only the undecided call went to the model: `ls -la` is the policy's.
    assert len(checks) == 1
    request, delivered, finished = checks[0]
    assert isinstance(request, GenerationRequest) and request.temperature == 0.0
    assert request.answer_schema["required"] == ["outcome", "explanation"]
    assert "frobnicate --all" in request.messages[-1].text
    assert finished is not None
    answer = json.loads("".join(m.text for m in delivered if isinstance(m, TextDelta)))
    assert given[0]["outcome"] == answer["outcome"]
    if answer["outcome"] == "flagged":
        assert given[0]["explanation"]


def judging(verdict, delay):
    """A script that answers the main request with an undecided call, and the
    model check (the request with an answer schema) with ``verdict`` after
    ``delay`` seconds."""
    main = calling(("Bash", {"command": "frobnicate --all"}), text=None)

    def script(request):
        if request.answer_schema is None:
            return main(request)
        return [Accepted(50, request.max_tokens), delay, TextDelta(json.dumps(verdict)),
                Finished("end_turn", None, 50, 9, 0.0, 0.0)]
    return script


def test_model_mode_keeps_a_stream_alive_while_the_model_judges(scripted, monkeypatch):
    monkeypatch.setattr(pensieve, "PING_INTERVAL_S", 0.05)
    srv = scripted(judging({"outcome": "not_flagged", "explanation": "A local tool."}, 0.5),
                   auto_mode_check="model")
    status, events = post(srv.url, body(stream=True))
    calls, results = replied(status, events)
    assert verdicts(results)[calls[0]["id"]] == {
        "type": "evaluated", "outcome": "not_flagged", "explanation": "A local tool"}
    names = [name for name, _ in events]
    last_block = len(names) - 1 - names[::-1].index("content_block_stop")
    assert "ping" in names[last_block:names.index("message_delta")]


def test_model_mode_keeps_the_careful_verdict_when_the_model_is_late(scripted):
    srv = scripted(judging({"outcome": "not_flagged", "explanation": "Fine."}, 2.0),
                   auto_mode_check="model")
    srv.server.api.check.timeout = 0.2
    calls, results = replied(*post(srv.url, body()))
    verdict = verdicts(results)[calls[0]["id"]]
    assert verdict["outcome"] == "flagged"
    assert "add `Bash(frobnicate:*)` to permissions.allow" in verdict["explanation"]
