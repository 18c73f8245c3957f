"""Tool calls and structured answers: call formats, the output parser, grammars.

Owns: how a model writes a tool call (``CallFormat``), the streaming parser
that turns generated text into thinking, text and tool-call events
(``OutputParser``; the events are engine/messages.py's), and the Lark
grammar (llguidance's dialect) that makes calls and JSON answers valid by
construction (``grammar``).

Never: runs the model or imports MLX. Pure, so tests drive it with strings.

The parser is a state machine fed text pieces as they are decoded. Marker
strings (``<tool_call>``, ``</think>``) may arrive split across pieces, so a
piece's tail that could start a marker is held back until the next piece
decides. A call's name is known from its head (``{"name": "X",
"arguments": ``); its arguments then stream as they are generated, tracked
by a JSON scanner that knows when the object closes.
"""

import json
import logging
from dataclasses import dataclass

from .messages import TextDelta, ThinkingDelta, ToolCallEnd, ToolCallStart, ToolInputDelta

log = logging.getLogger("pensieve.engine")


# --- How a model writes calls --------------------------------------------------


@dataclass(frozen=True)
class CallFormat:
    """A call is ``open + body + close``; calls in a row are joined by
    ``separator``. A JSON body is ``{"name": N, "arguments": {...}}``; other
    bodies are read by ``parse`` (one of mlx-lm's tool parsers) once whole."""

    open: str = "<tool_call>"
    close: str = "</tool_call>"
    separator: str = "\n"
    parse: object = None  # None: the JSON body above
    name: str = "pensieve"

    @property
    def json_body(self):
        return self.parse is None


# The fallback for templates without tools: one call per line.
FALLBACK_FORMAT = CallFormat()
# Templates mlx-lm recognises as "json_tools" (Qwen 2.5/3, Hermes) put the JSON
# on its own line inside the markers.
JSON_TOOLS_FORMAT = CallFormat(open="<tool_call>\n", close="\n</tool_call>",
                               name="json_tools")


def call_text(name, arguments, fmt=FALLBACK_FORMAT):
    """A call as the model writes it (the fallback and json_tools formats):
    ``json.dumps`` separators, keys in the given order, so that history
    renders the bytes the grammar made the model write."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return fmt.open + body + fmt.close


def call_head(name):
    """What a JSON body says before the arguments start."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


# --- The output parser ---------------------------------------------------------


def _held_prefix(text, marker):
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _JsonScanner:
    """Follows a JSON value character by character, to know where it ends."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, text):
        """Consume ``text``; return how many characters belong to the value
        (all of them unless it closed inside ``text``)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.started and self.depth <= 0:
                    return i + 1
            elif ch == '"':
                self.in_string = True
            elif not self.started and not ch.isspace():
                self.started = True  # a scalar: ends at the next , } or space
        return len(text)

    @property
    def done(self):
        return self.started and self.depth <= 0 and not self.in_string


class OutputParser:
    """Turns generated text into events, holding back what may be a marker.

    ``tools``: the names a call may use (unknown names stay text).
    ``thinking``: (start, end) markers when the model may think first;
    ``in_thinking``: the prompt already opened the thinking block.
    ``stream_arguments``: send arguments as they come (the grammar makes them
    valid); otherwise each call is checked whole before any of it is sent.
    ``calls``: whether calls are parsed at all (``tool_choice: none``).
    """

    def __init__(self, fmt=FALLBACK_FORMAT, tools=(), thinking=None, in_thinking=False,
                 stream_arguments=True, calls=True, tool_specs=None):
        self.fmt = fmt
        self.tools = set(tools)
        self.tool_specs = tool_specs  # for mlx-lm parsers that read the schemas
        self.think = thinking
        self.stream_arguments = stream_arguments and fmt.json_body
        self.calls_enabled = calls and bool(tools)
        # Nothing to look for: text passes through untouched.
        self.transparent = not self.calls_enabled and not thinking
        # States: think, text, head, args, tail, whole.
        self.state = "think" if thinking and in_thinking else "text"
        self.at_start = True  # nothing but whitespace emitted yet
        self.text_open = False  # the last block sent is text
        self.thought = self.state == "think"  # one thinking block, at the start
        self.buffer = ""  # held-back text of the current state
        self.space = ""  # whitespace held until text follows it
        self.dropped = ""  # the whitespace before the call being read
        self.calls = 0  # calls completed
        self.name = None
        self.args = ""
        self.scanner = None

    # Public API.

    def feed(self, text):
        events = []
        self.buffer += text
        while self.buffer:
            before = (self.state, len(self.buffer))
            getattr(self, "_" + self.state)(events)
            if (self.state, len(self.buffer)) == before:
                break  # waiting for more text
        return events

    def finish(self):
        """The end of generation: flush what is held. A call in progress is
        cut off: if its block was opened, it ends with ``input=None``;
        otherwise its text is returned as text."""
        events = []
        if self.state == "think":
            self._emit_thinking(events, self.buffer)
        elif self.state == "text":
            self._emit_text(events, self.buffer, end=True)
        elif self.state == "head" and self.stream_arguments:
            # Under a grammar this is surely a call: one whose head names a
            # single tool becomes that call, cut off; otherwise it is dropped.
            head = self.buffer.lstrip()
            names = [n for n in self.tools if call_head(n).startswith(head)
                     or head.startswith(call_head(n))]
            log.info("a tool call was cut off in its head (%s)",
                     names[0] if len(names) == 1 else "no name yet; dropped")
            if len(names) == 1:
                events += [ToolCallStart(names[0]), ToolCallEnd(None)]
        elif self.state in ("head", "whole"):
            log.info("a tool call was cut off before its end; kept as text")
            self._emit_text(events, self.dropped + self.fmt.open + self.buffer, end=True)
        elif self.state in ("args", "tail"):
            if self.state == "args" and self.buffer:
                events.append(ToolInputDelta(self.buffer))
            log.info("tool call %r was cut off in its arguments", self.name)
            events.append(ToolCallEnd(None))
        self.buffer = ""
        self.state = "done"
        return events

    @property
    def in_call(self):
        return self.state in ("head", "args", "tail", "whole")

    @property
    def calling(self):
        """The name of the call whose arguments are being written, or None."""
        return self.name if self.state in ("args", "tail") else None

    # States.

    def _think(self, events):
        start, end = self.think
        i = self.buffer.find(end)
        if i < 0:
            keep = _held_prefix(self.buffer, end)
            self._emit_thinking(events, self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return
        self._emit_thinking(events, self.buffer[:i])
        self.buffer = self.buffer[i + len(end):]
        self.state = "text"
        self.at_start = True

    def _text(self, events):
        markers = []
        if self.calls_enabled:
            markers.append(self.fmt.open)
        if self.think and self.at_start and not self.thought:
            markers.append(self.think[0])
        found = [(self.buffer.find(m), m) for m in markers]
        found = [(i, m) for i, m in found if i >= 0]
        if not found:
            keep = max((_held_prefix(self.buffer, m) for m in markers), default=0)
            self._emit_text(events, self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return
        i, marker = min(found)
        before, self.buffer = self.buffer[:i], self.buffer[i + len(marker):]
        if marker == self.fmt.open:
            self._emit_text(events, before)
            # Whitespace between text and a call is dropped (kept if the call
            # turns out not to be one).
            self.dropped, self.space = self.space, ""
            self.state = "head"
        elif before.strip():  # a think marker after text is just text
            self._emit_text(events, before + marker)
        else:
            self.state = "think"
            self.thought = True

    def _head(self, events):
        if not self.stream_arguments:
            self.state = "whole"
            return
        head = self.buffer.lstrip()
        for name in self.tools:
            expected = call_head(name)
            if head.startswith(expected):
                self.name = name
                self.buffer = head[len(expected):]
                self.args = ""
                self.scanner = _JsonScanner()
                events.append(ToolCallStart(name))
                self.state = "args"
                return
        if not any(call_head(n).startswith(head) for n in self.tools):
            self.state = "whole"  # not the expected shape: read it whole

    def _args(self, events):
        n = self.scanner.feed(self.buffer)
        piece, self.buffer = self.buffer[:n], self.buffer[n:]
        self.args += piece
        if piece:
            events.append(ToolInputDelta(piece))
        if self.scanner.done:
            self.state = "tail"

    def _tail(self, events):
        i = self.buffer.find(self.fmt.close)
        if i < 0:
            return  # the closing brace and marker are still to come
        self.buffer = self.buffer[i + len(self.fmt.close):]
        try:
            arguments = json.loads(self.args)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            log.warning("tool call %r has arguments that are not a JSON object",
                        self.name)
            arguments = None
        events.append(ToolCallEnd(arguments))
        self._after_call()

    def _whole(self, events):
        i = self.buffer.find(self.fmt.close)
        if i < 0:
            return
        body, self.buffer = self.buffer[:i], self.buffer[i + len(self.fmt.close):]
        call = self._parse_whole(body)
        if call is None:
            self._emit_text(events, self.dropped + self.fmt.open + body + self.fmt.close)
            self.state = "text"
            return
        name, arguments = call
        self.name = name
        events += [ToolCallStart(name),
                   ToolInputDelta(json.dumps(arguments, ensure_ascii=False)),
                   ToolCallEnd(arguments)]
        self._after_call()

    # Helpers.

    def _after_call(self):
        self.calls += 1
        self.state = "text"
        self.at_start = False
        self.text_open = False
        self.space = ""

    def _parse_whole(self, body):
        """A complete call's (name, arguments), or None (logged) if it is not one."""
        try:
            if self.fmt.json_body:
                call = json.loads(body)
            else:
                call = self.fmt.parse(body, self.tool_specs)
            if isinstance(call, list) and len(call) == 1:
                call = call[0]
            name = call["name"]
            arguments = call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
        except Exception as e:  # whatever the model wrote, it is not a call
            log.warning("unparseable tool call kept as text: %s", e)
            return None
        if name not in self.tools or not isinstance(arguments, dict):
            log.warning("tool call to %r kept as text: %s", name,
                        "unknown tool" if name not in self.tools
                        else "arguments are not an object")
            return None
        return name, arguments

    def _emit_text(self, events, text, end=False):
        """Text goes out as it comes. With calls or thinking about, whitespace
        is held until text follows it: leading whitespace, whitespace right
        before a call and whitespace ending the answer after a call are
        dropped, so they make no text block of their own."""
        if self.transparent:
            if text:
                events.append(TextDelta(text))
            return
        text = self.space + text
        if self.at_start:
            text = text.lstrip()
        body = text if end and (self.text_open or text.strip()) else text.rstrip()
        self.space = text[len(body):]
        if body:
            self.at_start = False
            self.text_open = True
            events.append(TextDelta(body))

    def _emit_thinking(self, events, text):
        if text:
            events.append(ThinkingDelta(text))


# --- Grammars (llguidance's Lark dialect) ---------------------------------------

# JSON written the way ``json.dumps`` writes it, so a call in history renders
# to the bytes the model wrote and the next turn's prompt reuses the cache.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ",
              "key_separator": ": ", "lenient": True}


def _literal(text):
    return json.dumps(text, ensure_ascii=False)


def _json_rule(schema):
    schema = dict(schema) if isinstance(schema, dict) else {}
    schema["x-guidance"] = {**JSON_STYLE, **schema.get("x-guidance", {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _regex_escape(text):
    """Escape ``text`` for a /regex/ in Lark (Rust regex syntax: < and > must
    not be escaped there, they are word boundaries)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)


def _constrained(fmt, tools, choice):
    """The (name, schema) of the tools a grammar holds calls to, and the
    choice among them: auto, any or none."""
    if not fmt.json_body:
        tools = ()  # calls in other formats are parsed, not constrained
    if choice not in ("auto", "any", "none"):
        tools = [(n, s) for n, s in tools if n == choice]
        choice = "any"
    if choice == "none":
        tools = ()
    return list(tools), choice


def grammar_subjects(fmt, tools, choice="auto", answer_schema=None):
    """The schemas ``grammar`` holds an answer to, given the same arguments:
    the names of the tools, then None for the answer's schema if used."""
    tools, choice = _constrained(fmt, tools, choice)
    subjects = [name for name, _ in tools]
    if answer_schema is not None and not (tools and choice == "any"):
        subjects.append(None)
    return tuple(subjects)


def grammar(fmt, tools, choice="auto", answer_schema=None, parallel=True,
            lead_space=False):
    """The Lark grammar of a whole answer, or None when nothing is constrained.

    ``tools``: [(name, input_schema)]; ``choice``: auto | any | none | a tool
    name (that tool); ``answer_schema``: the JSON schema a text answer must
    follow; ``parallel``: several calls allowed in one answer.
    ``lead_space``: allow a little whitespace first (after a thinking block).
    """
    tools, choice = _constrained(fmt, tools, choice)
    if not tools and answer_schema is None:
        return None
    lines = ["%llguidance {}"]
    lead = "/[ \\n]{0,2}/ " if lead_space else ""
    if tools:
        names = []
        for i, (name, schema) in enumerate(tools):
            lines.append(f"call_{i}: {_literal(call_head(name))} args_{i} \"}}\"")
            lines.append(f"args_{i}: {_json_rule(schema)}")
            names.append(f"call_{i}")
        lines.append("call: " + " | ".join(names))
        close = _literal(fmt.close)
        more = f"({_literal(fmt.separator + fmt.open)} call {close})*" if parallel else ""
        lines.append(f"calls: call {close} {more}")
    answer = None
    if answer_schema is not None:
        lines.append(f"answer: {_json_rule(answer_schema)}")
        answer = "answer"
    if tools and choice == "any":
        start = f"{lead}{_literal(fmt.open)} calls"
    elif tools:
        # Any text, then calls: the lazy head ends at the first call marker.
        lines.append(f"head[lazy]: /(?s:.*){_regex_escape(fmt.open)}/")
        text = answer or "TEXT"
        if answer is None:
            lines.append("TEXT: /(?s:.*)/ & ~/(?s:.*)" + _regex_escape(fmt.open)
                         + "(?s:.*)/")
        start = f"{lead}{text} | head calls"
        if answer is not None:
            start = f"{lead}answer | {lead}{_literal(fmt.open)} calls"
    else:
        start = f"{lead}{answer}"
    lines.append(f"start: {start}")
    return "\n".join(lines) + "\n"
