"""Text in and out of the model: prompt rendering and stop sequences.

Owns: turning a conversation (``Message``s and ``Tool``s, engine/messages.py)
into prompt tokens with the tokenizer's chat template, the context edits
applied to it first (clearing old thinking and tool results), keeping the
client's text text (``Shield``: a control token's spelling inside content
never becomes the control token), and the streaming stop-sequence matcher
that holds back text which might be the start of a stop sequence.

Never: runs the model. Pure given a tokenizer, so tests drive it directly.
"""

import dataclasses
import json
import re
from collections import OrderedDict

from .messages import Message
from .tools import call_text


class RenderError(ValueError):
    """The conversation cannot be rendered with this model's template."""


# --- Context edits: what the API's context_management clears before rendering ---

# What a cleared tool result reads as.
CLEARED_RESULT = "[this tool result was cleared to save context]"


def clear_thinking(messages, edit):
    """``messages`` with the thinking of the older assistant turns dropped,
    and how many turns lost theirs."""
    if edit.keep is None:
        return messages, 0
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    old = {i for i in turns[:-edit.keep] if messages[i].thinking}
    return tuple(dataclasses.replace(m, thinking="") if i in old else m
                 for i, m in enumerate(messages)), len(old)


def tool_uses(messages):
    """How many tool calls the conversation holds."""
    return sum(len(m.calls) for m in messages if m.role == "assistant")


def clear_tool_uses(messages, edit):
    """``messages`` with the oldest tool results (all but the last
    ``edit.keep``, outside ``edit.exclude``) replaced by CLEARED_RESULT, and
    how many were cleared. Tools a result loaded stay loaded."""
    names = {call_id: name for m in messages if m.role == "assistant"
             for call_id, name, _ in m.calls}
    results = [i for i, m in enumerate(messages)
               if m.role == "tool" and names.get(m.call_id) not in edit.exclude]
    cleared = set(results[:max(len(results) - edit.keep, 0)])
    ids = {messages[i].call_id for i in cleared}
    out = []
    for i, m in enumerate(messages):
        if i in cleared:
            m = dataclasses.replace(m, text=CLEARED_RESULT, is_error=False)
        elif m.role == "assistant" and edit.clear_inputs and m.calls:
            m = dataclasses.replace(m, calls=tuple(
                (call_id, name, {} if call_id in ids and (
                    edit.clear_inputs is True or name in edit.clear_inputs) else args)
                for call_id, name, args in m.calls))
        out.append(m)
    return tuple(out), len(cleared)


def as_message(m):
    """``m`` as a Message (a (role, text) pair becomes one)."""
    return m if isinstance(m, Message) else Message(*m)


def _plain_render(turns):
    # For models that ship no chat template: a readable transcript that ends
    # where the assistant should speak.
    lines = [f"{role}: {text}" for role, text, _ in turns]
    return "\n\n".join(lines) + "\n\nassistant:"


def _fold_system(dicts):
    """Fold system notes into a neighbouring user turn.

    For templates that refuse a system role after the first message: a note
    is prefixed to the user turn that follows it, or, with none following,
    appended to the user turn just before it; the conversation order is kept
    and no turn is added (many templates insist that roles alternate).
    """
    out, pending = [], []
    for d in dicts:
        if d["role"] == "system":
            pending.append(d["content"])
        elif d["role"] == "user" and pending:
            out.append({**d, "content": "\n\n".join(pending + [d["content"]])})
            pending = []
        else:
            out.append(d)
    if pending:
        if out and out[-1]["role"] == "user":
            out[-1] = {**out[-1], "content": "\n\n".join([out[-1]["content"], *pending])}
        else:
            out.append({"role": "user", "content": "\n\n".join(pending)})
    return out


TOOLS_INTRO = (
    "You can call tools. Each tool is described by one JSON object per line "
    "inside <tools></tools>:\n<tools>\n")
TOOLS_OUTRO = (
    "\n</tools>\nTo call a tool, answer with one line per call:\n"
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    "Each result comes back inside <tool_response></tool_response>.")


def _tool_lines(specs):
    """One compact JSON object per tool (dicts), keys in the client's order,
    so the text is the same on every turn and the prompt prefix stays
    reusable."""
    return "\n".join(json.dumps(t, ensure_ascii=False, separators=(", ", ": "))
                     for t in specs)


def tools_section(tools):
    """The fallback tool description (of Tools) for templates without tool
    support."""
    return TOOLS_INTRO + _tool_lines(t.as_dict() for t in tools) + TOOLS_OUTRO


def _function_spec(tool):
    """A Tool in the function form templates expect."""
    return {"type": "function", "function": {
        "name": tool.name, "description": tool.description or "",
        "parameters": tool.input_schema}}


def _loaded_text(m, native):
    """A turn's own text with the tools it loads or withdraws, where it
    stands in the conversation: definitions in the encoding of the prompt's
    own tool list (a ``<tools>`` block of one JSON object per line), so a
    tool found by tool search reads like one given at the start."""
    parts = []
    if m.tools:
        specs = [_function_spec(t) if native else t.as_dict() for t in m.tools]
        parts.append("<tools>\n" + _tool_lines(specs) + "\n</tools>")
    if m.removed:
        parts.append("No longer available: " + ", ".join(m.removed) + ".")
    if m.text:
        parts.append(m.text)
    return "\n".join(parts)


def template_takes_tools(tokenizer):
    template = getattr(tokenizer, "chat_template", None)
    return (getattr(tokenizer, "has_chat_template", False) and isinstance(template, str)
            and "tools" in template)


def _with_tools_section(turns, tools):
    """Put the tools section at the end of the leading system message."""
    section = tools_section(tools)
    if turns and turns[0][0] == "system":
        return [("system", f"{turns[0][1]}\n\n{section}", ""), *turns[1:]]
    return [("system", section, ""), *turns]


def _result_text(m, native=False):
    text = _loaded_text(m, native)
    return f"Error: {text}" if m.is_error else text


def _fallback_turns(messages):
    """Calls and results written out as text (the fallback format), as
    (role, text, thinking) turns; results join the user turn they belong to."""
    turns = []
    for m in messages:
        if m.role == "assistant":
            calls = "\n".join(call_text(name, args) for _, name, args in m.calls)
            turns.append(("assistant", "\n".join(p for p in (m.text, calls) if p),
                          m.thinking))
        elif m.role == "tool":
            turns.append(("user", f"<tool_response>\n{_result_text(m)}\n</tool_response>",
                          ""))
        else:
            turns.append((m.role, _loaded_text(m, False), ""))
    merged = []
    for role, text, thinking in turns:
        if merged and merged[-1][0] == role == "user":
            merged[-1] = (role, f"{merged[-1][1]}\n{text}", "")
        else:
            merged.append((role, text, thinking))
    return merged


def _takes_reasoning(tokenizer):
    """Whether the template renders an assistant turn's earlier thinking."""
    return "reasoning_content" in (getattr(tokenizer, "chat_template", "") or "")


def _native_dicts(tokenizer, messages):
    """Messages in the form templates with tool support expect."""
    reasoning = _takes_reasoning(tokenizer)
    out = []
    for m in messages:
        if m.role == "assistant":
            d = {"role": "assistant", "content": m.text}
            if m.calls:
                d["tool_calls"] = [{"id": id_, "type": "function", "function": {
                    "name": name, "arguments": args}} for id_, name, args in m.calls]
            if m.thinking and reasoning:
                d["reasoning_content"] = m.thinking
            out.append(d)
        elif m.role == "tool":
            out.append({"role": "tool", "content": _result_text(m, native=True),
                        "tool_call_id": m.call_id, "name": m.name})
        else:
            out.append({"role": m.role, "content": _loaded_text(m, True)})
    return out


def render_text(tokenizer, messages, tools=(), thinking=None):
    """Render ``messages`` (Messages or (role, text) pairs) as the prompt string.

    ``tools`` are Tools (name, input_schema, description): passed, as
    function specs, to templates that take tools, otherwise described in
    the system prompt, with calls and results in history written the same
    way. ``thinking``: True/False asks a template that can think to do so or
    not; None leaves it to the template. A trailing assistant message is a
    prefill: the answer continues from it.
    """
    messages = [as_message(m) for m in messages]
    prefill = ""
    if messages and messages[-1].role == "assistant" and not messages[-1].calls:
        prefill = messages.pop().text
    kwargs = {}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    if template_takes_tools(tokenizer):
        if tools:
            kwargs["tools"] = [_function_spec(t) for t in tools]
        dicts = _native_dicts(tokenizer, messages)
    else:
        turns = _fallback_turns(messages)
        if tools:
            turns = _with_tools_section(turns, tools)
        if not getattr(tokenizer, "has_chat_template", False):
            return _plain_render(turns) + (" " + prefill if prefill else "")
        reasoning = _takes_reasoning(tokenizer)
        dicts = [{"role": role, "content": text} for role, text, _ in turns]
        for d, (_, _, thinking) in zip(dicts, turns):
            if thinking and reasoning:
                d["reasoning_content"] = thinking
    attempts = [dicts]
    if any(d["role"] == "system" for d in dicts):
        attempts.append(_fold_system(dicts))
    error = None
    for attempt in attempts:
        try:
            text = tokenizer.apply_chat_template(attempt, add_generation_prompt=True,
                                                 tokenize=False, **kwargs)
        except Exception as e:  # jinja raises TemplateError and friends
            error = e
            continue
        return text + prefill
    raise RenderError(f"the model's chat template rejected the conversation: {error}")


def render_prompt(tokenizer, messages, tools=(), encode=None, thinking=None):
    """Render ``messages`` and tokenize the result (template adds BOS itself)
    with ``encode`` (a PromptEncoder: the client's text shielded first, so
    only the template makes control tokens) or the tokenizer itself."""
    if encode is not None:
        messages, tools = encode.shield(messages, tools)
        return encode(render_text(tokenizer, messages, tools, thinking))
    text = render_text(tokenizer, messages, tools, thinking)
    return tokenizer.encode(text, add_special_tokens=False)


# --- Untrusted text: what the client wrote stays text ----------------------------

# Inside content, the spelling of one of the tokenizer's added tokens
# (``<|im_start|>``) is written as ESCAPE and a code of its own before the
# template renders it: characters of the Supplementary Private Use Area-A,
# which no template alters, and which the encoder turns back into the
# spelling once it has cut the rendered text at the template's own
# spellings, then encodes as ordinary text. ESCAPE itself, where content
# holds it, is doubled, so whatever a client writes reads back as itself.
ESCAPE = "\U000f0000"
# The fallback call format's markers (TOOLS_OUTRO, call_text) are plain text
# to the model: inside content each is broken by a zero-width space after
# its "<", so a tool result cannot close its <tool_response> early, a
# description cannot close the <tools> block, and no content reads as a
# <tool_call> in the prompt. (The model's answers are not changed: what it
# writes is parsed as it writes it, engine/tools.py.)
MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
           "<tools>", "</tools>")
MARKER_BREAK = "\u200b"


class Shield:
    """Writes the client's strings so that control-token spellings in them
    cannot be told from text by the tokenizer, and reads them back.

    ``text(s)``: ``s`` with MARKERS broken and ``spellings`` escaped;
    ``restore(piece)``: a piece of rendered text with each escape turned
    back into its spelling (``literal``) or, for a tokenizer that will see
    the spelling (one encoded whole), into the spelling broken like MARKERS.
    """

    def __init__(self, spellings, literal=True):
        spellings = sorted(spellings, key=len, reverse=True)  # longest first
        codes = [chr(0xF0001 + i) for i in range(len(spellings))]
        self._escapes = [(s, ESCAPE + c) for s, c in zip(spellings, codes)]
        self._back = {c: s if literal else s[0] + MARKER_BREAK + s[1:]
                      for s, c in zip(spellings, codes)}
        self._back[ESCAPE] = ESCAPE
        self._firsts = {s[0] for s in (*spellings, *MARKERS)} | {ESCAPE}
        self._restore = re.compile(ESCAPE + "(.)", re.DOTALL)

    def text(self, s):
        # str.replace and `in` are C loops of ~15 ms on 30 MB, each letting
        # other threads run between them; most text holds no first character.
        if not any(c in s for c in self._firsts):
            return s
        for marker in MARKERS:
            if marker in s:
                s = s.replace(marker, marker[0] + MARKER_BREAK + marker[1:])
        if ESCAPE in s:
            s = s.replace(ESCAPE, ESCAPE + ESCAPE)
        for spelling, escaped in self._escapes:
            if spelling in s:
                s = s.replace(spelling, escaped)
        return s

    def restore(self, piece):
        if ESCAPE not in piece:
            return piece
        return self._restore.sub(lambda m: self._back.get(m.group(1), m.group(0)), piece)


def _shielded(value, text):
    """``value`` (JSON-like: str, dict, list, tuple) with ``text`` applied to
    every string in it, keys included."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {_shielded(k, text): _shielded(v, text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shielded(v, text) for v in value)
    return value


def shield_conversation(messages, tools, text):
    """Messages and Tools with ``text`` (Shield.text) applied to every string
    the client wrote: text, thinking, calls, ids, names, tool definitions.
    Roles are the API's own words."""
    def tool(t):
        return dataclasses.replace(t, name=text(t.name),
                                   input_schema=_shielded(t.input_schema, text),
                                   description=_shielded(t.description, text))

    out = []
    for m in map(as_message, messages):
        out.append(dataclasses.replace(
            m, text=text(m.text), thinking=text(m.thinking),
            calls=_shielded(m.calls, text), call_id=_shielded(m.call_id, text),
            name=_shielded(m.name, text), tools=tuple(map(tool, m.tools)),
            removed=_shielded(m.removed, text)))
    return tuple(out), tuple(map(tool, tools))


# A long piece of text is encoded in slices of about this many characters:
# one tokenizer call then takes ~15 ms here, so a 30 MB user message is no
# single call that holds the GIL for seconds (a plain encode does, measured:
# 3.6 s for 3 MB; encode_batch lets go of it but for its result's list).
SLICE_CHARS = 16384
# Regex searches over long text run in windows of this many characters: one
# search over 30 MB of "<" is one C call of 1.4 s that holds the GIL.
SEARCH_WINDOW = 65536
# Where a slice may end: before one space or newline between two non-space
# characters, where a byte-level pre-tokenizer cuts anyway (checked on a
# sample at load, PromptEncoder.sliced).
_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


class Cancelled(Exception):
    """The request was cancelled while its prompt was being encoded."""


def _text_tokenizer(tokenizer):
    """A copy of the tokenizer's backend that knows none of its added tokens,
    so it encodes their spellings as the ordinary text they are; or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


class PromptEncoder:
    """Tokenizes rendered prompts piece by piece, remembering the pieces.

    A tokenizer cuts its added tokens (``<|im_start|>`` and the like) out of
    the text first and encodes the text between them on its own, so a
    prompt's tokens are its pieces' tokens in a row. Each turn of a chat
    repeats the last turn's pieces (for Claude Code, a system prompt with its
    tools of ~20k tokens, 80 ms to encode) and adds a few: only those are
    encoded.

    Only the template's own spellings are cut out as control tokens: the
    client's strings are shielded first (``shield``, with Shield), and the
    pieces between are encoded by a copy of the tokenizer without added
    tokens, so a spelling in content comes back as its ordinary-text
    tokens. Long pieces are encoded in slices (SLICE_CHARS). Checked on a
    sample at load: ``usable`` (piece by piece equals the tokenizer's own
    encoding, and no spelling encoded as text makes a control token);
    ``sliced`` (slices equal the whole piece). When not usable each prompt
    is encoded whole, the spellings in content broken by a zero-width space.
    Not shared between threads: ``cancelled`` is the current call's.
    """

    SAMPLE = [("system", "Be brief.\n  Use tools: {\"a\": [1, 2]}\n"),
              ("user", "  Héllo,\tworld!\n\n```py\nx = 1\n```"),
              ("assistant", "Sure -- 12,345.67 ü 😀"), ("user", "\nAnd again? ")]

    def __init__(self, tokenizer, max_chars=8_000_000):
        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._ids = {t.content: i for i, t in added.items() if t.content}
        self._split = (re.compile("|".join(
            re.escape(t) for t in sorted(self._ids, key=len, reverse=True)))
            if self._ids else None)
        self._longest = max(map(len, self._ids), default=0)
        self._pieces = OrderedDict()  # text -> token ids, least recent first
        self._chars = 0
        self._max_chars = max_chars
        self._slice = SLICE_CHARS
        self.cancelled = None  # a callable: True ends the current call
        self.shielding = Shield(self._ids)
        self.sliced = False
        try:
            self._text = _text_tokenizer(tokenizer)
            self.usable = True  # while the check calls itself
            self.usable = self._check()
            self.sliced = self.usable and self._check_slices()
        except Exception:  # a tokenizer without these attributes: encode whole
            self.usable, self._text = False, None
        self._pieces.clear()
        self._chars = 0
        if not self.usable:
            self.shielding = Shield(self._ids, literal=False)

    def _check(self):
        sample = render_text(self._tokenizer, self.SAMPLE)
        if self._split is None or self._text is None:
            return False
        controls = set(self._ids.values())
        return self(sample) == self._reference(sample) and not any(
            controls & set(self._text.encode(s, add_special_tokens=False).ids)
            for s in self._ids)

    def _check_slices(self):
        probe = "".join(text for _, text in self.SAMPLE) * 3
        whole = self._text.encode(probe, add_special_tokens=False).ids
        self._slice, self.sliced = 8, True  # cut the probe wherever it may be cut
        try:
            return self._whole(probe) == whole
        finally:
            self._slice = SLICE_CHARS

    def shield(self, messages, tools=()):
        """``messages`` and ``tools`` with the client's strings shielded."""
        return shield_conversation(messages, tools, self.shielding.text)

    def _reference(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, text):
        if not self.usable:
            return self._reference(self.shielding.restore(text))
        ids = []
        for special, part in self._parts(text):
            if special:
                ids.append(self._ids[part])
            elif part:
                ids += self._piece(part)
        return ids

    def _parts(self, text):
        """(is a control token, text) in order: the template's spellings and
        the text between them, searched window by window."""
        n, pos, last = len(text), 0, 0
        while pos < n:
            end = min(n, pos + SEARCH_WINDOW)
            m = self._split.search(text, pos, min(n, end + self._longest))
            if m is None or m.start() >= end:
                pos = end
                continue
            yield False, text[last:m.start()]
            yield True, m.group()
            last = pos = m.end()
        yield False, text[last:]

    def _piece(self, text):
        ids = self._pieces.get(text)
        if ids is not None:
            self._pieces.move_to_end(text)
            return ids
        ids = self._whole(self.shielding.restore(text))
        if len(text) > self._max_chars // 2:
            return ids  # would push out everything remembered
        self._pieces[text] = ids
        self._chars += len(text)
        while self._chars > self._max_chars:
            old, _ = self._pieces.popitem(last=False)
            self._chars -= len(old)
        return ids

    def _whole(self, text):
        """A piece of ordinary text (no added token is recognised in it) as
        tokens, slice by slice when it is long and that was checked."""
        if not self.sliced or len(text) <= self._slice:
            return self._text.encode(text, add_special_tokens=False).ids
        ids = []
        for part in self._slices(text):
            if self.cancelled is not None and self.cancelled():
                raise Cancelled()
            # encode_batch releases the GIL while it works (encode does not).
            ids += self._text.encode_batch([part], add_special_tokens=False)[0].ids
        return ids

    def _slices(self, text):
        """``text`` cut into slices of about ``self._slice`` characters, each
        cut where _CUT allows (a text without such a place stays whole)."""
        size, n, start = self._slice, len(text), 0
        while n - start > size:
            cut, lo = None, start + size
            while cut is None and lo < n:
                cut = _CUT.search(text, lo, min(n, lo + max(size, SEARCH_WINDOW)))
                lo += max(size, SEARCH_WINDOW)
            if cut is None:
                break
            yield text[start:cut.start()]
            start = cut.start()
        yield text[start:]


class StopMatcher:
    """Find stop sequences in streamed text, holding back partial matches.

    ``feed(text)`` returns ``(safe_text, matched)``: text that can be sent now,
    and the stop sequence that just completed (None if none). Text after a
    match is dropped, as is the sequence itself. ``flush()`` returns held-back
    text at the end of generation.
    """

    def __init__(self, stop_sequences=()):
        # Imported here, not at module level: importing mlx-lm imports MLX,
        # which must wait until the engine thread has chosen the BLAS.
        from mlx_lm.generate import TextStateMachine

        self._machine = TextStateMachine
        self._names = {f"stop:{i}": s for i, s in enumerate(stop_sequences)}
        transitions = {"normal": [(s, name) for name, s in self._names.items()]}
        transitions.update({name: [] for name in self._names})
        self._state = TextStateMachine(transitions).make_state("normal")
        self.matched = None

    def feed(self, text):
        if self.matched is not None or not text:
            return "", None
        self._state, segments = self._machine.split(self._state, text)
        safe = "".join(t for name, t in segments if name == "normal")
        self.matched = self._names.get(self._state[0])
        return safe, self.matched

    def flush(self):
        if self.matched is not None:
            return ""
        self._state, held, _ = self._machine.flush(self._state)
        return held
