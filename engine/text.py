"""Text in and out of the model: prompt rendering and stop sequences.

Owns: turning a conversation (``Message``s and ``Tool``s, engine/messages.py)
into prompt tokens with the tokenizer's chat template, the context edits
applied to it first (clearing old thinking and tool results), and the
streaming stop-sequence matcher that holds back text which might be the
start of a stop sequence.

Never: runs the model. Pure given a tokenizer, so tests drive it directly.
"""

import dataclasses
import json

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
    with ``encode`` (a PromptEncoder) or the tokenizer itself."""
    text = render_text(tokenizer, messages, tools, thinking)
    if encode is not None:
        return encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


class PromptEncoder:
    """Tokenizes prompts piece by piece, remembering the pieces.

    A tokenizer cuts its added tokens (``<|im_start|>`` and the like) out of
    the text first and encodes the text between them on its own, so a
    prompt's tokens are its pieces' tokens in a row. Each turn of a chat
    repeats the last turn's pieces (for Claude Code, a system prompt with its
    tools of ~20k tokens, 80 ms to encode) and adds a few: only those are
    encoded. ``usable`` is False when the tokenizer does not pass that check
    on a sample; then each prompt is encoded whole.
    """

    SAMPLE = [("system", "Be brief.\n  Use tools: {\"a\": [1, 2]}\n"),
              ("user", "  Héllo,\tworld!\n\n```py\nx = 1\n```"),
              ("assistant", "Sure -- 12,345.67 ü 😀"), ("user", "\nAnd again? ")]

    def __init__(self, tokenizer, max_chars=8_000_000):
        import re
        from collections import OrderedDict

        self._tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._ids = {t.content: i for i, t in added.items() if t.content}
        self._split = (re.compile("(" + "|".join(
            re.escape(t) for t in sorted(self._ids, key=len, reverse=True)) + ")")
            if self._ids else None)
        self._pieces = OrderedDict()  # text -> token ids, least recent first
        self._chars = 0
        self._max_chars = max_chars
        self.usable = False
        try:
            sample = render_text(tokenizer, self.SAMPLE)
            self.usable = (self._split is not None
                           and self(sample) == self._whole(sample))
        except Exception:  # a tokenizer without these attributes: encode whole
            pass
        self._pieces.clear()
        self._chars = 0

    def _whole(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, text):
        if self._split is None:
            return self._whole(text)
        ids = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._ids[part])
            elif part:
                ids += self._piece(part)
        return ids

    def _piece(self, text):
        ids = self._pieces.get(text)
        if ids is not None:
            self._pieces.move_to_end(text)
            return ids
        ids = self._whole(text)
        self._pieces[text] = ids
        self._chars += len(text)
        while self._chars > self._max_chars:
            old, _ = self._pieces.popitem(last=False)
            self._chars -= len(old)
        return ids


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
