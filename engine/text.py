"""Text in and out of the model: prompt rendering and stop sequences.

Owns: turning a conversation into prompt tokens with the tokenizer's chat
template, and the streaming stop-sequence matcher that holds back text which
might be the start of a stop sequence.

Never: runs the model. Pure given a tokenizer, so tests drive it directly.
"""

import json


class RenderError(ValueError):
    """The conversation cannot be rendered with this model's template."""


def _plain_render(messages):
    # For models that ship no chat template: a readable transcript that ends
    # where the assistant should speak.
    lines = [f"{role}: {text}" for role, text in messages]
    return "\n\n".join(lines) + "\n\nassistant:"


def _fold_system(messages):
    """Fold system notes into a neighbouring user turn, in place.

    For templates that refuse a system role after the first message: a note
    is prefixed to the user turn that follows it, or, with none following,
    appended to the user turn just before it; the conversation order is kept
    and no turn is added (many templates insist that roles alternate).
    """
    out, pending = [], []
    for role, text in messages:
        if role == "system":
            pending.append(text)
        elif role == "user" and pending:
            out.append((role, "\n\n".join(pending + [text])))
            pending = []
        else:
            out.append((role, text))
    if pending:
        if out and out[-1][0] == "user":
            out[-1] = ("user", "\n\n".join([out[-1][1], *pending]))
        else:
            out.append(("user", "\n\n".join(pending)))
    return out


TOOLS_INTRO = (
    "You can call tools. Each tool is described by one JSON object per line "
    "inside <tools></tools>:\n<tools>\n")
TOOLS_OUTRO = (
    "\n</tools>\nTo call a tool, answer with one line per call:\n"
    '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>')


def tools_section(tools):
    """The fallback tool description for templates without tool support.

    One compact JSON object per tool, keys in the client's order, so the text
    is the same on every turn and the prompt prefix stays reusable.
    """
    lines = [json.dumps(t, ensure_ascii=False, separators=(", ", ": ")) for t in tools]
    return TOOLS_INTRO + "\n".join(lines) + TOOLS_OUTRO


def _template_takes_tools(tokenizer):
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _with_tools_section(messages, tools):
    """Put the tools section at the end of the leading system message."""
    section = tools_section(tools)
    if messages and messages[0][0] == "system":
        return [("system", f"{messages[0][1]}\n\n{section}"), *messages[1:]]
    return [("system", section), *messages]


def render_text(tokenizer, messages, tools=()):
    """Render ``messages`` ((role, text) pairs) as the prompt string.

    ``tools`` are Anthropic tool definitions (name, description,
    input_schema): passed to templates that take tools, otherwise described in
    the system prompt. A trailing assistant message is a prefill: the answer
    continues from it.
    """
    messages = list(messages)
    prefill = ""
    if messages and messages[-1][0] == "assistant":
        prefill = messages.pop()[1]
    kwargs = {}
    if tools and getattr(tokenizer, "has_chat_template", False) \
            and _template_takes_tools(tokenizer):
        kwargs["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema", {})}} for t in tools]
    elif tools:
        messages = _with_tools_section(messages, tools)
    if not getattr(tokenizer, "has_chat_template", False):
        return _plain_render(messages) + (" " + prefill if prefill else "")
    attempts = [messages]
    if any(role == "system" for role, _ in messages):
        attempts.append(_fold_system(messages))
    error = None
    for attempt in attempts:
        dicts = [{"role": role, "content": text} for role, text in attempt]
        try:
            text = tokenizer.apply_chat_template(dicts, add_generation_prompt=True,
                                                 tokenize=False, **kwargs)
        except Exception as e:  # jinja raises TemplateError and friends
            error = e
            continue
        return text + prefill
    raise RenderError(f"the model's chat template rejected the conversation: {error}")


def render_prompt(tokenizer, messages, tools=(), encode=None):
    """Render ``messages`` and tokenize the result (template adds BOS itself)
    with ``encode`` (a PromptEncoder) or the tokenizer itself."""
    text = render_text(tokenizer, messages, tools)
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
