"""Pure tests of engine/tools.py: the streaming output parser and the grammars.

No model and no MLX. Every parser case is fed split every way (one character
at a time, 2, 3 and 5 characters, whole) and must give the same events once
runs of deltas are merged. The grammar tests read the Lark text; where
llguidance is installed they also run it over SmolLM2's tokenizer to show
what it accepts and rejects.
"""

import json

import pytest

from engine.tools import (FALLBACK_FORMAT, JSON_TOOLS_FORMAT, CallFormat, OutputParser,
                          TextDelta, ThinkingDelta, ToolCallEnd, ToolCallStart,
                          ToolInputDelta, call_head, call_text, grammar)

TOOLS = ("bash", "get_weather")
THINK = ("<think>", "</think>")
SIZES = (1, 2, 3, 5, None)  # None: the whole text in one piece


def feed(pieces, **kw):
    """Feed ``pieces`` to a fresh parser; return (raw events, parser)."""
    parser = OutputParser(**{"tools": TOOLS, **kw})
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.finish(), parser


def merged(events):
    """Join runs of text, thinking and argument deltas into one event each."""
    out = []
    for e in events:
        if out and type(e) is type(out[-1]) and type(e) in (TextDelta, ThinkingDelta,
                                                            ToolInputDelta):
            field = "json" if type(e) is ToolInputDelta else "text"
            e = type(e)(getattr(out.pop(), field) + getattr(e, field))
        out.append(e)
    return out


def parse(text, **kw):
    """Merged events for ``text``, asserted identical for every split."""
    results = []
    for size in SIZES:
        size = size or len(text) or 1
        events, parser = feed([text[i:i + size] for i in range(0, len(text), size)], **kw)
        results.append((merged(events), parser.calls))
    for r in results[1:]:
        assert r == results[0]
    return results[0]


def call(name, args):
    """The events of one complete, streamed call."""
    return [ToolCallStart(name), ToolInputDelta(json.dumps(args)), ToolCallEnd(args)]


# --- Text ----------------------------------------------------------------------

PLAIN = '  \n Hello <tool_call>{"name": "bash"} <think>x</think> {}\n\n '


@pytest.mark.parametrize("kw", [{"tools": ()}, {"calls": False}], ids=["no-tools", "calls-off"])
def test_text_passes_through_untouched_when_nothing_is_parsed(kw):
    assert parse(PLAIN, **kw) == ([TextDelta(PLAIN)], 0)


def test_text_with_tools_drops_only_leading_whitespace():
    assert parse("\n  Hello,\n world.  \n") == ([TextDelta("Hello,\n world.  \n")], 0)


def test_partial_marker_at_the_end_is_flushed_as_text():
    assert parse("Hello <tool") == ([TextDelta("Hello <tool")], 0)
    assert parse("Hi <", thinking=THINK) == ([TextDelta("Hi <")], 0)


def test_calls_off_keeps_calls_as_text_after_thinking():
    text = "Hi\n" + call_text("bash", {"command": "ls"})
    assert parse("<think>t</think>" + text, thinking=THINK, calls=False) == (
        [ThinkingDelta("t"), TextDelta(text)], 0)


# --- Calls ---------------------------------------------------------------------


def test_marker_split_across_pieces():
    c = call_text("bash", {"command": "ls"})
    events, parser = feed(["Hi <tool_", "call>", c[len("<tool_call>"):]])
    assert merged(events) == [TextDelta("Hi"), *call("bash", {"command": "ls"})]
    assert parser.calls == 1


def test_text_then_one_call():
    args = {"command": "ls -la", "timeout": 5}
    text = "Let me look.\n\n" + call_text("bash", args)
    assert parse(text) == ([TextDelta("Let me look."), *call("bash", args)], 1)


def test_text_then_two_calls_and_trailing_text():
    a, b = {"command": "pwd"}, {"city": "Paris", "unit": "c"}
    text = ("Two things.\n" + call_text("bash", a) + "\n" + call_text("get_weather", b)
            + "\nDone.")
    assert parse(text) == ([TextDelta("Two things."), *call("bash", a),
                            *call("get_weather", b), TextDelta("\nDone.")], 2)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_whitespace_after_the_last_call_makes_no_text_block(stream):
    text = "Hi \n" + call_text("bash", {"command": "ls"}) + "\n\n"
    assert parse(text, stream_arguments=stream) == (
        [TextDelta("Hi"), *call("bash", {"command": "ls"})], 1)


def test_arguments_stream_as_written():
    written = '{"command":  "ls",\n "n": [1, 2.5e3, null]}'  # not json.dumps' spacing
    text = '<tool_call>{"name": "bash", "arguments": ' + written + "}</tool_call>"
    events, _ = feed(text)  # one character at a time
    deltas = [e.json for e in events if isinstance(e, ToolInputDelta)]
    assert len(deltas) > 1  # streamed, not held to the end
    assert "".join(deltas) == written
    assert events[0] == ToolCallStart("bash")
    assert events[-1] == ToolCallEnd(json.loads(written))


def test_braces_and_quotes_inside_strings_do_not_end_arguments():
    args = {"command": "echo '}' \"{\"", "list": [1, {"a": "]"}], "path": "C:\\dir\\"}
    text = "x\n" + call_text("bash", args) + " after"
    assert parse(text) == ([TextDelta("x"), *call("bash", args), TextDelta(" after")], 1)


def test_call_cut_off_in_or_after_its_arguments_ends_with_no_input():
    c = call_text("bash", {"command": "echo hi", "timeout": 10})
    cut = c.index("hi") + 1
    head = "<tool_call>" + call_head("bash")
    assert parse("Hi\n" + c[:cut]) == (
        [TextDelta("Hi"), ToolCallStart("bash"), ToolInputDelta(c[len(head):cut]),
         ToolCallEnd(None)], 0)
    c = call_text("bash", {"command": "ls"})  # cut in the closing marker
    assert parse(c[:-len("</tool_call>") + 3]) == (
        [ToolCallStart("bash"), ToolInputDelta('{"command": "ls"}'), ToolCallEnd(None)], 0)


@pytest.mark.parametrize("text, events", [
    ("Hi\n<tool_call>", [TextDelta("Hi")]),  # no name yet: dropped
    ('Hi\n<tool_call>{"name": "ba', [TextDelta("Hi"), ToolCallStart("bash"),
                                     ToolCallEnd(None)]),
    ('<tool_call> {"name": "bash", "argu', [ToolCallStart("bash"), ToolCallEnd(None)]),
])
def test_call_cut_off_in_its_head(text, events):
    # Streamed (under a grammar) it is surely a call: cut off, if it has a name.
    assert parse(text) == (events, 0)
    # Checked whole (no grammar), it is text.
    assert parse(text, stream_arguments=False) == ([TextDelta(text.lstrip())], 0)


@pytest.mark.parametrize("body, stream", [
    ('{"name": "rm_rf", "arguments": {"path": "/"}}', True),  # unknown tool
    ('{"name": "rm_rf", "arguments": {"path": "/"}}', False),
    ("not json at all", True),
    ("not json at all", False),
    ('{"name": "bash", "arguments": {oops}}', False),
    ('{"name": "bash", "arguments": [1]}', False),  # arguments not an object
], ids=["unknown-streamed", "unknown-whole", "garbage-streamed", "garbage-whole",
        "not-json-whole", "not-object-whole"])
def test_bad_calls_come_back_as_text(body, stream):
    text = "Hi\n<tool_call>" + body + "</tool_call> ok"
    assert parse(text, stream_arguments=stream) == ([TextDelta(text)], 0)


def test_whole_mode_sends_a_valid_call_in_three_events():
    args = {"command": "cat a.txt"}
    # Compact JSON is fine here: the body is parsed, then re-serialised.
    text = 'Ok\n<tool_call>{"name":"bash","arguments":{"command":"cat a.txt"}}</tool_call>'
    assert parse(text, stream_arguments=False) == ([TextDelta("Ok"), *call("bash", args)], 1)
    events, _ = feed(text, stream_arguments=False)  # one character at a time
    assert [e for e in events if not isinstance(e, TextDelta)] == call("bash", args)


def test_json_tools_format():
    a, b = {"command": "ls"}, {"city": "Oslo"}
    text = ("Checking.\n" + call_text("bash", a, JSON_TOOLS_FORMAT) + "\n"
            + call_text("get_weather", b, JSON_TOOLS_FORMAT))
    assert "<tool_call>\n{" in text and "}\n</tool_call>" in text
    assert parse(text, fmt=JSON_TOOLS_FORMAT) == (
        [TextDelta("Checking."), *call("bash", a), *call("get_weather", b)], 2)


# --- Thinking ------------------------------------------------------------------


def test_thinking_then_text():
    assert parse("<think>abc</think>\n\nHello", thinking=THINK) == (
        [ThinkingDelta("abc"), TextDelta("Hello")], 0)


def test_prompt_opened_thinking():
    assert parse("a < b\n</think>\nHello", thinking=THINK, in_thinking=True) == (
        [ThinkingDelta("a < b\n"), TextDelta("Hello")], 0)
    events, _ = feed(["abc</th", "ink>Hello"], thinking=THINK, in_thinking=True)
    assert merged(events) == [ThinkingDelta("abc"), TextDelta("Hello")]
    assert parse("abc</thi", thinking=THINK, in_thinking=True) == (
        [ThinkingDelta("abc</thi")], 0)


def test_think_marker_after_text_is_text():
    text = "Hello <think>x</think> there"
    assert parse(text, thinking=THINK) == ([TextDelta(text)], 0)


def test_thinking_then_call():
    args = {"command": "date"}
    text = "<think>Use bash.</think>\n" + call_text("bash", args)
    assert parse(text, thinking=THINK) == ([ThinkingDelta("Use bash."), *call("bash", args)], 1)


# --- Grammars: the text --------------------------------------------------------

SCHEMAS = [
    ("bash", {"type": "object", "properties": {"command": {"type": "string"}},
              "required": ["command"]}),
    ("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}),
]
ANSWER = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_grammar_none_when_nothing_is_constrained():
    assert grammar(FALLBACK_FORMAT, [], "auto") is None
    assert grammar(FALLBACK_FORMAT, SCHEMAS, "none") is None
    assert grammar(CallFormat(parse=lambda body, specs: None), SCHEMAS, "any") is None
    assert grammar(FALLBACK_FORMAT, SCHEMAS, "none", answer_schema=ANSWER) is not None


@pytest.mark.parametrize("choice", ["auto", "any"])
def test_grammar_has_every_tool(choice):
    g = grammar(FALLBACK_FORMAT, SCHEMAS, choice)
    for name, _ in SCHEMAS:
        assert json.dumps(call_head(name)) in g


def test_grammar_named_choice_has_only_that_tool():
    g = grammar(FALLBACK_FORMAT, SCHEMAS, "get_weather")
    assert json.dumps(call_head("get_weather")) in g
    assert json.dumps(call_head("bash")) not in g


def test_grammar_parallel():
    assert ")*" in grammar(FALLBACK_FORMAT, SCHEMAS, "any")
    assert ")*" not in grammar(FALLBACK_FORMAT, SCHEMAS, "any", parallel=False)


# --- Grammars: what llguidance accepts ------------------------------------------

# The tests here read the embedded model's tokenizer (its GGUF imported into
# MLX): marked ``model``.


@pytest.fixture(scope="module")
def accepts():
    """accepts(grammar, text): whether the grammar takes the whole of ``text``."""
    llguidance = pytest.importorskip("llguidance")
    transformers = pytest.importorskip("transformers")
    from engine.models import ModelError, embedded_gguf, imported_dir

    try:
        directory = imported_dir(embedded_gguf())
    except ModelError as e:
        pytest.skip(str(e))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    lt = llguidance.LLTokenizer(tok.backend_tokenizer.to_str())

    def check(g, text):
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(g))
        assert not m.is_error(), m.get_error()
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    return check


@pytest.mark.model
def test_forced_grammar_accepts_only_valid_calls(accepts):
    g = grammar(FALLBACK_FORMAT, SCHEMAS, "any")
    good = call_text("get_weather", {"city": "Paris", "unit": "f"})
    assert accepts(g, good)
    assert accepts(g, good + "\n" + call_text("bash", {"command": "ls"}))
    assert not accepts(g, call_text("get_weather", {}))  # city is required
    assert not accepts(g, call_text("get_weather", {"unit": "c"}))
    assert not accepts(g, call_text("get_weather", {"city": "Paris", "unit": "k"}))
    assert not accepts(g, call_text("bash", {"command": 5}))
    assert not accepts(g, call_text("rm_rf", {"command": "ls"}))
    assert not accepts(g, "Sure.\n" + good)
    assert not accepts(g, "")


@pytest.mark.model
def test_single_call_grammar_rejects_a_second_call(accepts):
    g = grammar(FALLBACK_FORMAT, SCHEMAS, "bash", parallel=False)
    c = call_text("bash", {"command": "ls"})
    assert accepts(g, c)
    assert not accepts(g, c + "\n" + c)
    assert not accepts(g, call_text("get_weather", {"city": "Paris"}))


@pytest.mark.model
@pytest.mark.parametrize("fmt", [FALLBACK_FORMAT, JSON_TOOLS_FORMAT],
                         ids=["fallback", "json_tools"])
def test_auto_grammar_allows_text_then_calls(accepts, fmt):
    g = grammar(fmt, SCHEMAS, "auto")
    c = call_text("bash", {"command": "ls"}, fmt)
    assert accepts(g, "Just an answer, {no calls}.")
    assert accepts(g, "text\n" + c)
    assert accepts(g, c + "\n" + c)
    bad = call_text("bash", {"cmd": "ls"}, fmt)
    assert not accepts(g, "text\n" + bad)


@pytest.mark.model
def test_lead_space_allows_whitespace_before_a_forced_call(accepts):
    c = call_text("bash", {"command": "ls"})
    assert accepts(grammar(FALLBACK_FORMAT, SCHEMAS, "any", lead_space=True), "\n\n" + c)
    assert not accepts(grammar(FALLBACK_FORMAT, SCHEMAS, "any"), "\n" + c)


@pytest.mark.model
def test_answer_grammar_takes_json_dumps_output_only(accepts):
    g = grammar(FALLBACK_FORMAT, [], answer_schema=ANSWER)
    assert accepts(g, json.dumps({"n": 1}))
    assert not accepts(g, json.dumps({"n": "one"}))
    assert not accepts(g, json.dumps({"m": 1}))
    assert not accepts(g, '{"n":1}')  # compact separators
    assert not accepts(g, "n is 1")


def test_a_format_of_its_own_is_read_whole_by_mlx_lms_parser():
    """Formats mlx-lm knows but that are not JSON (here Qwen3-Coder's) are not
    streamed or constrained: each call is read whole by mlx-lm's parser."""
    from mlx_lm.tool_parsers import qwen3_coder

    fmt = CallFormat(parse=qwen3_coder.parse_tool_call, name="qwen3_coder")
    specs = [{"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"},
                                         "timeout": {"type": "integer"}}}}}]
    call = ("<tool_call>\n<function=bash>\n<parameter=command>\nls -la\n</parameter>\n"
            "<parameter=timeout>\n5\n</parameter>\n</function>\n</tool_call>")
    events, calls = parse("Listing.\n" + call, fmt=fmt, tool_specs=specs)
    assert calls == 1 and events[0] == TextDelta("Listing.")
    assert events[1:] == [ToolCallStart("bash"),
                          ToolInputDelta('{"command": "ls -la", "timeout": 5}'),
                          ToolCallEnd({"command": "ls -la", "timeout": 5})]
    # Not a call of that format: text.
    events, calls = parse("<tool_call>oops</tool_call>", fmt=fmt, tool_specs=specs)
    assert calls == 0 and [type(e) for e in events] == [TextDelta]
