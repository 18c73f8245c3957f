"""Tool use and structured answers with the real SmolLM2, through the SDK.

The embedded 135M model is too small to choose tools well, which is the
point: forced calls must still come out schema-valid on every sample,
because the grammar, not the model, guarantees the shape. Samples are drawn
at temperature 1 (a different draw every run), many at once so the batch
decodes them together.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import jsonschema
import pytest

from helpers import API_KEY, PensieveProcess

SAMPLES = 20
# Room for the longest answer the schemas allow, at one token per character
# and a \uXXXX escape for each: a sampled string may run to its maxLength.
ROOM = 600

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enum": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                       "city": {"type": "string", "maxLength": 30}},
        "required": ["unit", "city"], "additionalProperties": False},
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 12},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "optional_fields": {
        "type": "object",
        "properties": {"path": {"type": "string", "maxLength": 40},
                       "offset": {"type": "integer", "minimum": 0, "maximum": 10000},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 2000}},
        "required": ["path"], "additionalProperties": False},
    "numbers": {
        "type": "object",
        "properties": {"latitude": {"type": "number", "minimum": -90, "maximum": 90},
                       "longitude": {"type": "number", "minimum": -180, "maximum": 180},
                       "radius_km": {"type": "integer", "minimum": 1, "maximum": 500}},
        "required": ["latitude", "longitude", "radius_km"], "additionalProperties": False},
}

PROMPTS = {
    "nested_object": "Register the customer Ada Lovelace who lives in London.",
    "enum": "What is the weather in Paris?",
    "array_of_objects": "Order two apples and one pear.",
    "optional_fields": "Open the file notes.txt.",
    "numbers": "Find restaurants near the Eiffel Tower.",
}


def tool(name):
    return {"name": name, "description": f"Tool taking {name.replace('_', ' ')}.",
            "input_schema": SCHEMAS[name]}


@pytest.fixture(scope="module")
def client(real_server):
    return anthropic.Anthropic(base_url=real_server, api_key=API_KEY, max_retries=0,
                               timeout=600)


def streamed_call(client, name, choice):
    """One forced call, streamed: the final message and the raw JSON pieces."""
    pieces = []
    with client.messages.stream(
            model="m", max_tokens=ROOM, tools=[tool(name)], extra_body={"temperature": 1.0},
            tool_choice={**choice, "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": PROMPTS[name]}]) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                pieces.append(event.delta.partial_json)
        return stream.get_final_message(), pieces


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_forced_calls_are_schema_valid_on_every_sample(client, name):
    """SAMPLES draws per schema, half forced with ``any``, half by name. The
    first runs alone so the others find its prompt in the prompt cache."""
    choices = [{"type": "any"}, {"type": "tool", "name": name}] * (SAMPLES // 2)
    results = [streamed_call(client, name, choices[0])]
    with ThreadPoolExecutor(SAMPLES) as pool:
        results += pool.map(lambda c: streamed_call(client, name, c), choices[1:])
    assert len(results) == SAMPLES
    for message, pieces in results:
        assert message.stop_reason == "tool_use", message
        (block,) = message.content
        assert block.type == "tool_use" and block.name == name
        assert block.id.startswith("toolu_")
        jsonschema.validate(block.input, SCHEMAS[name])
        # The pieces streamed are exactly the final input, as JSON text.
        assert json.loads("".join(pieces)) == block.input and len(pieces) > 1
    assert len({m.content[0].id for m, _ in results}) == SAMPLES


def test_non_streaming_call_and_parallel_calls(client):
    message = client.messages.create(
        model="m", max_tokens=120, extra_body={"temperature": 0.0},
        tools=[tool("enum"), tool("numbers")],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": PROMPTS["enum"]}])
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and all(b.type == "tool_use" for b in message.content), message.content
    complete = calls if message.stop_reason == "tool_use" else calls[:-1]
    assert complete, message  # at least one call finished within 120 tokens
    for block in complete:
        jsonschema.validate(block.input, SCHEMAS[block.name])
    assert len({b.id for b in calls}) == len(calls)


def test_call_cut_off_by_max_tokens_ends_cleanly(client):
    with client.messages.stream(
            model="m", max_tokens=6, tools=[tool("nested_object")],
            tool_choice={"type": "any"},
            messages=[{"role": "user", "content": PROMPTS["nested_object"]}]) as stream:
        events = [e.type for e in stream]
        message = stream.get_final_message()
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["tool_use"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 1
    assert events[-1] == "message_stop"


def test_round_trip_tool_result_then_answer(client):
    tools = [tool("enum")]
    messages = [{"role": "user", "content": PROMPTS["enum"]}]
    first = client.messages.create(model="m", max_tokens=60, tools=tools,
                                   extra_body={"temperature": 0.0},
                                   tool_choice={"type": "any",
                                                "disable_parallel_tool_use": True},
                                   messages=messages)
    (call,) = first.content
    messages += [{"role": "assistant", "content": [c.model_dump() for c in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": "Sunny, 21 degrees."}]}]
    second = client.messages.create(model="m", max_tokens=40, tools=tools,
                                    extra_body={"temperature": 0.0},
                                    messages=messages)
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.content and second.content[0].type in ("text", "tool_use")
    # Turn 2's prompt starts with turn 1's prompt and answer, as rendered:
    # the prompt cache served all of turn 1's prompt.
    used = second.usage
    assert used.cache_read_input_tokens >= first.usage.input_tokens
    # An error result is accepted as well.
    messages[-1]["content"][0].update(is_error=True, content=[{"type": "text",
                                                               "text": "No network."}])
    third = client.messages.create(model="m", max_tokens=8, tools=tools, messages=messages)
    assert third.content


def test_structured_answer_follows_its_schema(client):
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60}},
              "required": ["title"], "additionalProperties": False}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.messages.create(
            model="m", max_tokens=ROOM,
            messages=[{"role": "user", "content": "Title this chat: a trip to Rome."}],
            extra_body={"temperature": 1.0, "output_config": {"format": {
                "type": "json_schema", "schema": schema}}}), range(4)))
    for message in answers:
        assert message.stop_reason == "end_turn"
        jsonschema.validate(json.loads(message.content[0].text), schema)


def test_tool_choice_errors_name_the_field(client):
    with pytest.raises(anthropic.BadRequestError, match="tool_choice.name"):
        client.messages.create(model="m", max_tokens=8, tools=[tool("enum")],
                               tool_choice={"type": "tool", "name": "missing"},
                               messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model="m", max_tokens=8, tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "hi"}])


@pytest.mark.process
def test_without_the_grammar_the_server_says_so_and_still_answers(cache_dir, smollm_dir):
    server = PensieveProcess(cache_dir, "--grammar", "off", "--default-temperature", "0",
                             name="no-grammar")
    try:
        client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
        message = client.messages.create(
            model="m", max_tokens=24, tools=[tool("enum")], tool_choice={"type": "any"},
            messages=[{"role": "user", "content": PROMPTS["enum"]}])
        assert message.content and message.stop_reason in ("end_turn", "max_tokens",
                                                           "tool_use")
    finally:
        server.stop()
    assert "unconstrained" in server.log()


def test_each_turn_renders_as_a_prefix_of_the_next(smollm_dir):
    """Calls and results in history render the same way on every turn, and a
    call renders as the very text the grammar makes the model write."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from engine.text import render_text
    from engine.tools import call_text
    from pensieve import parse_messages_request

    tokenizer = load_tokenizer(smollm_dir)
    tools = [tool("optional_fields"), tool("enum")]
    call = {"type": "tool_use", "id": "toolu_1", "name": "optional_fields",
            "input": {"path": "notes.txt", "limit": 20}}
    turns = [
        [{"role": "user", "content": "Open notes.txt, then check the weather."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "Opening it."}, call]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                       "content": [{"type": "text", "text": "buy milk"}]},
                                      {"type": "text", "text": "Go on."}]}],
        [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2",
                                            "name": "enum",
                                            "input": {"unit": "celsius", "city": "Oslo"}}]},
         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2",
                                       "is_error": True, "content": "offline"}]}],
    ]
    history, prompts = [], []
    for turn in turns:
        history += turn
        raw = json.dumps({"model": "m", "max_tokens": 9, "system": "Be brief.",
                          "tools": tools, "messages": history}).encode()
        gen = parse_messages_request(raw).generation
        prompts.append(render_text(tokenizer, gen.messages, gen.tools))
    for earlier, later in zip(prompts, prompts[1:]):
        assert later.startswith(earlier)
    written = "Opening it.\n" + call_text("optional_fields", call["input"]) + "<|im_end|>"
    assert prompts[1][len(prompts[0]):].startswith(written)
    assert "<tool_response>\nbuy milk\n</tool_response>" in prompts[1]
    assert "<tool_response>\nError: offline\n</tool_response>" in prompts[2]
