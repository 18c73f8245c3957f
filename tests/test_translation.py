"""Pure tests: request parsing and translation, SSE encoding, prompt rendering
and the stop-sequence matcher. No sockets, no model."""

import json
from pathlib import Path

import pytest

from engine import Finished, Message, TextDelta, Tool
from engine.text import StopMatcher, _fold_system, render_text
from pensieve import (ApiError, Blocks, error_body, message_body, parse_messages_request,
                      sse_event, stream_end_events, stream_error_event,
                      stream_start_events)


def parse(**body):
    base = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    return parse_messages_request(json.dumps({**base, **body}).encode())


def bad(raw):
    with pytest.raises(ApiError) as info:
        parse_messages_request(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value.message


# --- Parsing ----------------------------------------------------------------------


def test_minimal_request_and_defaults():
    req = parse()
    assert req.model == "m" and req.stream is False
    gen = req.generation
    assert gen.max_tokens == 10 and gen.messages == (Message("user", "hi"),)
    assert gen.temperature == 1.0 and gen.top_p is None and gen.top_k is None
    assert gen.stop_sequences == ()


def test_blocks_system_and_merging():
    req = parse(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": "Be kind."}],
                messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                       {"type": "text", "text": "b"}]},
                          {"role": "user", "content": "c"},
                          {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"},
                                                            {"type": "text", "text": "d"}]}])
    assert req.generation.messages == (
        Message("system", "Be brief.\n\nBe kind."), Message("user", "a\n\nb\n\nc"),
        Message("assistant", "d", thinking="x"))


def test_unused_fields_are_accepted():
    req = parse(thinking={"type": "adaptive"}, tools=[{"name": "t", "input_schema": {}}],
                output_config={"effort": "low"}, context_management={"edits": []},
                metadata={"user_id": "u"}, stream=True, temperature=0, top_p=0.5, top_k=3,
                stop_sequences=["x", "y", "x"])
    gen = req.generation
    assert req.stream and gen.temperature == 0.0 and gen.top_p == 0.5 and gen.top_k == 3
    assert gen.stop_sequences == ("x", "y")


@pytest.mark.parametrize("body, field", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    ([1, 2], "JSON object"),
    ({"max_tokens": 1, "messages": []}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
    ({"model": "m", "max_tokens": 0, "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": "5", "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": True, "messages": []}, "max_tokens"),
    ({"model": "m", "max_tokens": 5}, "messages: Field required"),
    ({"model": "m", "max_tokens": 5, "messages": {}}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content.0.text"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {}}]}]}, "text only"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "temperature": 2}, "temperature"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "top_p": "high"}, "top_p"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "top_k": 1.5}, "top_k"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "stop_sequences": "x"}, "stop_sequences"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "stop_sequences": [""]}, "stop_sequences"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "stream": "yes"}, "stream"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "system": 7}, "system"),
])
def test_bad_requests_name_the_field(body, field):
    assert field in bad(body)


def test_deeply_nested_json_is_a_400():
    assert "nested deeper than" in bad(b"[" * 100000 + b"]" * 100000)


# --- Responses and SSE --------------------------------------------------------------

DONE = Finished("stop_sequence", "END", 12, 5, 0.1, 10.0)


def test_message_body_shape():
    body = message_body("msg_1", "claude-x", [{"type": "text", "text": "hello"}], DONE)
    assert body == {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                    "content": [{"type": "text", "text": "hello"}],
                    "stop_reason": "stop_sequence", "stop_sequence": "END",
                    "usage": {"input_tokens": 12, "output_tokens": 5,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def test_error_body_shape():
    assert error_body("api_error", "boom", "req_1") == {
        "type": "error", "error": {"type": "api_error", "message": "boom"}, "request_id": "req_1"}


def decode(raw):
    name, data, blank = raw.decode().split("\n", 2)
    assert name.startswith("event: ") and data.startswith("data: ") and blank == "\n"
    return name[7:], json.loads(data[6:])


def test_sse_event_framing_and_unicode():
    raw = sse_event("content_block_delta", {"text": "é\nline"})
    assert raw.count(b"\n\n") == 1 and raw.endswith(b"\n\n")  # newline in data is escaped
    assert decode(raw) == ("content_block_delta", {"text": "é\nline"})


def test_stream_sequence():
    blocks = Blocks()
    events = [decode(e) for e in stream_start_events("msg_1", "m", 7)]
    events += [decode(e) for e in blocks.add(TextDelta("Hi"))]
    events += [decode(e) for e in blocks.finish() + stream_end_events(DONE)]
    names = [n for n, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["usage"]["input_tokens"] == 7 and start["content"] == []
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Hi"}
    assert events[5][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert events[5][1]["usage"] == {"input_tokens": 12, "output_tokens": 5,
                                     "cache_creation_input_tokens": 0,
                                     "cache_read_input_tokens": 0}


def test_stream_error_event():
    name, data = decode(stream_error_event("api_error", "boom", "req_1"))
    assert name == "error" and data["error"] == {"type": "api_error", "message": "boom"}


# --- Stop sequences -------------------------------------------------------------------


def feed_all(matcher, chunks):
    out = []
    for chunk in chunks:
        text, matched = matcher.feed(chunk)
        out.append(text)
        if matched:
            return "".join(out), matched
    return "".join(out) + matcher.flush(), None


@pytest.mark.parametrize("chunks, stops, expected", [
    (["Hello E", "N", "D more"], ["END"], ("Hello ", "END")),
    (["abc"], ["END"], ("abc", None)),
    (["Hello E", "Nx"], ["END"], ("Hello ENx", None)),    # held back, then released
    (["x\n\nHu", "man:", " hi"], ["\n\nHuman:"], ("x", "\n\nHuman:")),
    (["aab"], ["ab"], ("a", "ab")),                         # overlap with the prefix
    (["one two"], ["two", "one"], ("", "one")),             # the earliest wins
    (["tail E"], ["END"], ("tail E", None)),                # flushed at the end
])
def test_stop_matcher(chunks, stops, expected):
    assert feed_all(StopMatcher(stops), chunks) == expected


def test_stop_matcher_without_stops_passes_through():
    m = StopMatcher(())
    assert m.feed("anything") == ("anything", None) and m.flush() == ""


# --- Rendering ----------------------------------------------------------------------------


class Template:
    """A tokenizer stand-in whose template refuses system messages."""
    has_chat_template = True

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_system_folded_when_template_refuses_it():
    text = render_text(Template(), [("system", "S"), ("user", "U"), ("assistant", "A"),
                                    ("user", "V")])
    assert text == "<user>S\n\nU<assistant>A<user>V<assistant>"


def test_trailing_assistant_is_a_prefill():
    assert render_text(Template(), [("user", "U"), ("assistant", "The answer is")]) == \
        "<user>U<assistant>The answer is"


def test_trailing_system_note_joins_the_user_turn_before_it():
    # As Claude Code sends it: the note comes after the user's message.
    assert fold([("system", "S"), ("user", "U"), ("system", "note")]) == \
        [("user", "S\n\nU\n\nnote")]
    assert fold([("user", "U"), ("assistant", "A"), ("system", "note")]) == \
        [("user", "U"), ("assistant", "A"), ("user", "note")]


def fold(turns):
    dicts = _fold_system([{"role": r, "content": t} for r, t in turns])
    return [(d["role"], d["content"]) for d in dicts]


def test_fold_system_keeps_order():
    assert fold([("user", "a"), ("assistant", "b"), ("system", "note"), ("user", "c")]) == \
        [("user", "a"), ("assistant", "b"), ("user", "note\n\nc")]


def test_real_template_renders_multi_turn(smollm_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tok = load_tokenizer(smollm_dir)
    text = render_text(tok, [("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V")])
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                    "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nV<|im_end|>\n"
                    "<|im_start|>assistant\n")


# --- Tools in the prompt (the fallback for templates without tool support) ----------

TOOLS = ({"name": "Read", "description": "Read a file.",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                           "required": ["path"]}},)


def as_tools(dicts):
    """Tool definitions (dicts) as the engine's Tools."""
    return tuple(Tool(d["name"], d["input_schema"], d.get("description")) for d in dicts)


def test_tools_are_reduced_to_what_the_prompt_needs():
    req = parse(tools=[{"name": "Read", "description": "Read a file.", "cache_control":
                        {"type": "ephemeral"}, "input_schema": TOOLS[0]["input_schema"]},
                       {"type": "web_search_20250305", "name": "web_search"}])
    assert req.generation.tools == as_tools(TOOLS)  # server tools (no input_schema) left out


@pytest.mark.parametrize("tools, field", [
    ({"name": "x"}, "tools"),
    ([{"description": "no name"}], "tools.0"),
    ([{"name": "x", "input_schema": "object"}], "tools.0.input_schema"),
])
def test_bad_tools(tools, field):
    assert field in bad({"model": "m", "max_tokens": 5, "tools": tools,
                         "messages": [{"role": "user", "content": "x"}]})


def test_tools_section_joins_the_leading_system_message():
    text = render_text(Template(), [("system", "S"), ("user", "U")], as_tools(TOOLS))
    # Template() refuses system roles, so everything was folded into the user turn.
    assert text.startswith("<user>S\n\nYou can call tools.")
    assert '{"name": "Read", "description": "Read a file.", "input_schema": ' in text
    assert text.endswith("</tool_response>.\n\nU<assistant>")


def test_billing_line_is_dropped():
    req = parse(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=2;"},
                        {"type": "text", "text": "Be brief."}])
    assert req.generation.messages[0] == Message("system", "Be brief.")


def test_inline_system_note_stays_in_place(smollm_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    req = parse(messages=[{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"},
                          {"role": "system", "content": "note"},
                          {"role": "user", "content": "c"}])
    text = render_text(load_tokenizer(smollm_dir), req.generation.messages)
    assert text.index("user\na") < text.index("assistant\nb") < \
        text.index("system\nnote") < text.index("user\nc")


class ToolTemplate(Template):
    """A stand-in whose template takes tools in the function format."""
    chat_template = "{% if tools %}...{% endif %}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
        self.tools = tools
        return super().apply_chat_template(messages, add_generation_prompt, tokenize)


def test_templates_that_take_tools_get_them_as_functions():
    template = ToolTemplate()
    text = render_text(template, [("user", "U")], as_tools(TOOLS))
    assert text == "<user>U<assistant>"  # nothing added to the messages
    assert template.tools == [{"type": "function", "function": {
        "name": "Read", "description": "Read a file.",
        "parameters": TOOLS[0]["input_schema"]}}]


def test_tool_blocks_become_calls_and_results():
    req = parse(messages=[
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "ls", "signature": "s"},
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
             "content": [{"type": "text", "text": "denied"},
                         {"type": "image", "source": {"type": "base64", "data": "x"}}]},
            {"type": "text", "text": "Try again."}]}])
    assert req.generation.messages[1:] == (
        Message("assistant", "Sure.", calls=(("toolu_1", "Bash", {"command": "ls"}),),
                thinking="ls"),
        Message("tool", "denied\n\n[image omitted: this model reads text only]",
                call_id="toolu_1", name="Bash", is_error=True),
        Message("user", "Try again."))


@pytest.mark.parametrize("extra, field", [
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [{"name": "t", "input_schema": {}}],
      "tool_choice": {"type": "tool", "name": "u"}}, "tool_choice.name"),
    ({"tools": [{"name": "t", "input_schema": {}}],
      "tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ({"output_config": {"format": {"type": "regex"}}}, "output_config.format"),
    ({"thinking": {"type": "maybe"}}, "thinking"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "t", "input": []}]}]},
     "messages.0.content.0.input"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, "messages.0.content.0.tool_use_id"),
])
def test_tool_fields_are_checked(extra, field):
    with pytest.raises(ApiError) as e:
        parse(**extra)
    assert e.value.status == 400 and field in e.value.message


# --- Claude Code 2.1.33x: tool search, system messages, effort, thinking ----------

CAPTURES_332 = sorted((Path(__file__).parent / "captures" / "claude-2.1.332").glob("*.json"))
WEB_FETCH = {"name": "WebFetch", "description": "Fetch a URL.",
             "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}}}


@pytest.mark.parametrize("path", [p for p in CAPTURES_332 if p.name != "probe.json"],
                         ids=lambda p: p.stem)
def test_every_captured_request_parses(path):
    body = json.loads(path.read_text())["body"]
    req = parse_messages_request(json.dumps(body).encode())
    offered = {t.name for t in req.generation.offered}
    assert "DeferredToolPlaceholder" not in offered
    assert not any(t.name == "DeferredToolPlaceholder" for t in req.generation.tools)


def deferred_body(**extra):
    return {"tools": [TOOLS[0], {**WEB_FETCH, "defer_loading": True},
                      {"name": "DeferredToolPlaceholder", "description": "never call",
                       "input_schema": {"type": "object"}, "defer_loading": True}],
            **extra}


def test_deferred_tools_cost_nothing_until_a_tool_reference_loads_them():
    first = parse(**deferred_body()).generation
    assert first.tools == as_tools(TOOLS) and first.offered == as_tools(TOOLS)
    call = {"type": "tool_use", "id": "toolu_1", "name": "ToolSearch",
            "input": {"query": "select:WebFetch"}}
    loaded = parse(**deferred_body(messages=[
        {"role": "user", "content": "fetch it"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "tool_reference", "tool_name": "WebFetch"}]},
            {"type": "text", "text": "Tool loaded."}]}],
        tool_choice={"type": "tool", "name": "WebFetch"})).generation
    assert loaded.tools == as_tools(TOOLS)  # the prompt's start is unchanged
    assert [t.name for t in loaded.offered] == ["Read", "WebFetch"]
    assert loaded.tool_choice == "WebFetch"
    result = loaded.messages[2]
    assert result.role == "tool" and result.tools == as_tools([WEB_FETCH]) and result.text == ""
    text = render_text(Template(), loaded.messages, loaded.tools)
    assert text.index('"name": "Read"') < text.index("<tool_response>\n<tools>\n"
                                                     '{"name": "WebFetch"')


def test_a_deferred_tool_not_loaded_cannot_be_forced():
    with pytest.raises(ApiError) as info:
        parse(**deferred_body(tool_choice={"type": "tool", "name": "WebFetch"}))
    assert "tool_choice.name" in info.value.message


def test_tool_additions_and_removals_take_effect_where_they_stand():
    gen = parse(**deferred_body(messages=[
        {"role": "user", "content": "a"},
        {"role": "system", "content": [
            {"type": "tool_addition", "tool": {"type": "tool_reference", "name": "WebFetch"}},
            {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "Read"}},
            {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
                "name": "Now", "input_schema": {"type": "object"}}}}]},
        {"role": "user", "content": "b"}])).generation
    assert [t.name for t in gen.offered] == ["WebFetch", "Now"]
    note = gen.messages[1]
    assert note.role == "system" and note.removed == ("Read",)
    assert [t.name for t in note.tools] == ["WebFetch", "Now"]
    text = render_text(Template(), gen.messages, gen.tools)
    assert "No longer available: Read." in text


def test_system_messages_empty_cleared_and_string_or_blocks_render_alike():
    same = [parse(messages=[{"role": "user", "content": "a"},
                            {"role": "system", "content": content}]).generation.messages
            for content in ("note", [{"type": "text", "text": "note",
                                      "cache_control": {"type": "ephemeral"}}])]
    assert same[0] == same[1] == (Message("user", "a"), Message("system", "note"))
    gen = parse(messages=[{"role": "user", "content": "a"},
                          {"role": "system", "content": [], "output_config": {"effort": "low"}},
                          {"role": "system", "content": "old", "clear_at": "next_user_message"},
                          {"role": "user", "content": "b"},
                          {"role": "system", "content": "new", "clear_at": "next_user_message"},
                          {"role": "system", "content": [{"type": "future_block"}]}]).generation
    assert gen.messages == (Message("user", "a"), Message("user", "b"),
                            Message("system", "new"))


@pytest.mark.parametrize("body, thinks", [
    ({"thinking": {"type": "adaptive"}}, True),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, False),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"},
      "messages": [{"role": "user", "content": "hi"},
                   {"role": "system", "content": [], "output_config": {"effort": "high"}}]},
     True),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
      "messages": [{"role": "user", "content": "hi"},
                   {"role": "system", "content": [], "output_config": {"effort": "low"}}]},
     False),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024},
      "output_config": {"effort": "low"}}, True),
    ({}, None),
])
def test_effort_low_lets_adaptive_thinking_answer_at_once(body, thinks):
    assert parse(**body).generation.thinking is thinks


def test_omitted_thinking_round_trips_through_its_signature():
    from engine import ThinkingDelta
    from pensieve import thinking_from_signature

    blocks = Blocks(sse=True, show_thinking=False)
    events = b"".join(blocks.add(ThinkingDelta("let me see")) + blocks.add(TextDelta("4"))
                      + blocks.finish())
    assert b"thinking_delta" not in events and b"let me see" not in events
    signature = blocks.content[0]["signature"]
    assert blocks.content[0]["thinking"] == "" and thinking_from_signature(signature) == "let me see"
    gen = parse(thinking={"type": "adaptive", "display": "omitted"},
                context_management={"edits": [{"type": "clear_thinking_20251015",
                                               "keep": "all"}]},
                messages=[{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": [
                              {"type": "thinking", "thinking": "", "signature": signature},
                              {"type": "text", "text": "4"}]},
                          {"role": "user", "content": "and 3+3?"}]).generation
    assert gen.messages[1] == Message("assistant", "4", thinking="let me see")
    assert thinking_from_signature("pensieve1.not-base64!") is None


def test_clear_thinking_keeps_the_latest_turns():
    from engine import ClearThinking
    from engine.text import clear_thinking

    def turn(n):
        return [{"role": "user", "content": f"q{n}"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": f"t{n}", "signature": "s"},
                    {"type": "text", "text": f"a{n}"}]}]

    def thoughts(**extra):
        gen = parse(thinking={"type": "adaptive"}, messages=turn(1) + turn(2) + turn(3)
                    + [{"role": "user", "content": "q4"}], **extra).generation
        (edit,) = [e for e in gen.context_edits if isinstance(e, ClearThinking)]
        messages, cleared = clear_thinking(gen.messages, edit)
        return [m.thinking for m in messages if m.role == "assistant"], edit.implicit

    assert thoughts() == (["", "", "t3"], True)  # the API's default: the last turn's
    keep = {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 2}}
    assert thoughts(context_management={"edits": [keep]}) == (["", "t2", "t3"], False)
    every = {"type": "clear_thinking_20251015", "keep": "all"}
    assert thoughts(context_management={"edits": [every]}) == (["t1", "t2", "t3"], False)
    assert "keep" in bad({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "x"}], "context_management": {"edits": [
            {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns",
                                                        "value": 0}}]}})


def test_clear_tool_uses_replaces_the_oldest_results():
    from engine import ClearToolUses
    from engine.text import CLEARED_RESULT, clear_tool_uses

    def round_(n, name="Bash"):
        return [{"role": "assistant", "content": [
                    {"type": "tool_use", "id": f"toolu_{n}", "name": name,
                     "input": {"command": f"cmd {n}"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{n}",
                     "content": f"output {n}"}]}]

    gen = parse(messages=[{"role": "user", "content": "go"}, *round_(1), *round_(2, "Read"),
                          *round_(3), *round_(4)],
                context_management={"edits": [{
                    "type": "clear_tool_uses_20250919",
                    "trigger": {"type": "tool_uses", "value": 2},
                    "keep": {"type": "tool_uses", "value": 1},
                    "exclude_tools": ["Read"], "clear_tool_inputs": True}]}).generation
    (edit,) = gen.context_edits
    assert edit == ClearToolUses(trigger_tokens=None, trigger_uses=2, keep=1,
                                 exclude=("Read",), clear_inputs=True)
    messages, cleared = clear_tool_uses(gen.messages, edit)
    results = [m.text for m in messages if m.role == "tool"]
    assert cleared == 2 and results == [CLEARED_RESULT, "output 2", CLEARED_RESULT, "output 4"]
    inputs = [m.calls[0][2] for m in messages if m.role == "assistant"]
    assert inputs == [{}, {"command": "cmd 2"}, {}, {"command": "cmd 4"}]


def test_applied_edits_are_reported_as_the_api_does():
    done = Finished("end_turn", None, 10, 2, 0.1, 5.0)
    applied = ({"type": "clear_tool_uses_20250919", "cleared_tool_uses": 2,
                "cleared_input_tokens": 40},)
    body = message_body("msg_1", "m", [], done, applied)
    assert body["context_management"] == {"applied_edits": list(applied)}
    assert "context_management" not in message_body("msg_1", "m", [], done)
    delta = json.loads(stream_end_events(done, applied)[0].split(b"data: ")[1])
    assert delta["context_management"] == {"applied_edits": list(applied)}
