"""A constraint never lapses silently: the grammar holds, or the request fails.

Some JSON schemas compile and then fail while decoding: llguidance's parser
or lexer hits one of its limits (an unsatisfiable recursive ``$ref`` blows
its item count at the first token; a regex like ``(a|aa|aaa){300}`` blows
its lexer's expression budget once the answer reaches that field). Such a
request must fail with an error naming the schema, a 400 before the stream
or ``event: error`` after it, never a 200 whose JSON breaks the schema, and
the log gets one short line, not llguidance's multi-kilobyte state dump.
Driven through the real server and engine on the tiny random-weight model,
whose output is garbage: only the grammar gives it shape.
"""

import json
import logging

import jsonschema
import pytest

from helpers import assert_error, call, sse_events

# An array of arrays, each of at least one more: no finite JSON value has
# this shape, and llguidance finds out only by expanding it while decoding.
ENDLESS = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"},
                           "minItems": 1}},
           "$ref": "#/$defs/n"}
# Legal, but the lexer cannot build ``b``'s regex: it fails once the answer
# gets there, after the first field has been generated (and streamed).
LATE = {"type": "object",
        "properties": {"a": {"enum": ["x", "y"]},
                       "b": {"type": "string", "pattern": "^(a|aa|aaa){300}$"}},
        "required": ["a", "b"], "additionalProperties": False}
ORDINARY = {"type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["unit", "days"], "additionalProperties": False}


def forced(name, schema, **changes):
    return {"model": "m", "max_tokens": 120, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Go"}],
            "tools": [{"name": name, "description": "d", "input_schema": schema}],
            "tool_choice": {"type": "tool", "name": name, "disable_parallel_tool_use": True},
            **changes}


def answer(schema, **changes):
    return {"model": "m", "max_tokens": 120, "temperature": 0.0,
            "messages": [{"role": "user", "content": "Go"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
            **changes}


def assert_short_log(caplog):
    """Every record is one line of modest length: no grammar state dump."""
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and len(text) < 600, text[:2000]
        assert "<state>" not in text and record.exc_info is None, text[:2000]


@pytest.mark.parametrize("schema", [ENDLESS, LATE], ids=["at-once", "midway"])
def test_a_tool_schema_that_lapses_is_a_400_naming_the_tool(tiny_server, caplog, schema):
    caplog.set_level(logging.INFO)
    reply = call(tiny_server, "POST", "/v1/messages", forced("deep_tool", schema))
    message = assert_error(reply, 400, "invalid_request_error")
    assert "deep_tool" in message and "input_schema" in message, message
    assert "<state>" not in message and len(message) < 600, message
    assert_short_log(caplog)


def test_an_answer_schema_that_lapses_is_a_400_naming_it(tiny_server, caplog):
    caplog.set_level(logging.INFO)
    reply = call(tiny_server, "POST", "/v1/messages", answer(ENDLESS))
    message = assert_error(reply, 400, "invalid_request_error")
    assert "output_config.format" in message, message
    assert_short_log(caplog)


@pytest.mark.parametrize("schema", [ENDLESS, LATE], ids=["at-once", "midway"])
def test_a_streamed_lapse_ends_in_an_error_event(tiny_server, caplog, schema):
    caplog.set_level(logging.INFO)
    reply = call(tiny_server, "POST", "/v1/messages",
                 forced("deep_tool", schema, stream=True))
    assert reply.status == 200  # the stream had started
    events = sse_events(reply.body)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "error", names
    assert "message_stop" not in names and "message_delta" not in names, names
    error = events[-1][1]["error"]
    assert error["type"] == "invalid_request_error"
    assert "deep_tool" in error["message"] and "input_schema" in error["message"]
    assert_short_log(caplog)


def test_a_lapse_leaves_no_broken_grammar_behind(tiny_server):
    """llguidance's copies of one compiled grammar share their lexer: once one
    has failed, a cached copy would fail at its first token. The next request
    with that schema gets a grammar compiled anew, which holds as far as the
    first one's did (greedy: the same tokens); other schemas are unharmed."""
    failed_after = []
    for _ in range(2):
        reply = call(tiny_server, "POST", "/v1/messages", forced("deep_tool", LATE))
        message = assert_error(reply, 400, "invalid_request_error")
        failed_after.append(int(message.split(" failed after ")[1].split(" tokens")[0]))
    assert failed_after[0] > 0 and failed_after[1] == failed_after[0], failed_after
    reply = call(tiny_server, "POST", "/v1/messages", forced("weather", ORDINARY))
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("stream", [False, True])
def test_an_ordinary_schema_still_holds_to_the_end(tiny_server, stream):
    reply = call(tiny_server, "POST", "/v1/messages",
                 forced("weather", ORDINARY, stream=stream))
    assert reply.status == 200, reply.body
    if stream:
        events = sse_events(reply.body)
        assert events[-1][0] == "message_stop"
        arguments = json.loads("".join(
            data["delta"]["partial_json"] for name, data in events
            if name == "content_block_delta" and data["delta"]["type"] == "input_json_delta"))
    else:
        (block,) = [b for b in reply.json["content"] if b["type"] == "tool_use"]
        assert reply.json["stop_reason"] == "tool_use"
        arguments = block["input"]
    jsonschema.validate(arguments, ORDINARY)


def test_an_ordinary_answer_schema_still_holds_to_the_end(tiny_server):
    reply = call(tiny_server, "POST", "/v1/messages", answer(ORDINARY))
    assert reply.status == 200, reply.body
    assert reply.json["stop_reason"] == "end_turn"
    jsonschema.validate(json.loads(reply.json["content"][0]["text"]), ORDINARY)


def test_a_lapse_in_the_batch_fails_that_request_alone(tiny_server):
    """Sent together, the two decode in one batch: the lapse ends its own."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: call(tiny_server, "POST", "/v1/messages", b),
                                [forced("deep_tool", LATE), forced("weather", ORDINARY)] * 2))
    for lapsed, ordinary in zip(replies[::2], replies[1::2]):
        assert "deep_tool" in assert_error(lapsed, 400, "invalid_request_error")
        assert ordinary.status == 200, ordinary.body
        (block,) = [b for b in ordinary.json["content"] if b["type"] == "tool_use"]
        jsonschema.validate(block["input"], ORDINARY)
