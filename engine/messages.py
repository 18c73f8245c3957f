"""The contract between the event loop and the engine thread.

Owns: every value that crosses between the two sides, as frozen dataclasses:
what is asked (``GenerationRequest``, ``CountRequest`` and the conversation's
``Message``, ``Tool`` and context edits), what comes back for it
(``Accepted``, the content events, ``Finished``, ``Failed``, ``Counted``), what
the engine says about itself (``ModelInfo`` once loaded, ``Stats``), and the
shape of an engine (``EngineLike``) that the server drives.

Never: imports MLX or asyncio, or holds behaviour beyond reading its own
fields. Both sides import it; it imports neither.
"""

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

# --- The conversation ----------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A tool the model may call: Anthropic's definition, reduced to what a
    prompt shows (``description`` None: the client gave none)."""

    name: str
    input_schema: dict = field(default_factory=dict)
    description: str | None = None

    def as_dict(self):
        """The definition as the client wrote it, keys in its order (the
        prompt's text, and so its cached prefix, depend on that order)."""
        out = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["input_schema"] = self.input_schema
        return out


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, as the engine renders it.

    ``role``: system, user, assistant, or tool (a tool's result, answering
    the call ``call_id`` to ``name``). An assistant turn may carry
    ``thinking`` and ``calls``: ((id, name, input), ...) after its text.
    A tool result or a system note may make tools callable from that point on
    (``tools``: their Tools, rendered there, as tool search and
    mid-conversation tool changes do) or withdraw them (``removed``: names).
    A plain (role, text) pair is accepted wherever a Message is.
    """

    role: str
    text: str = ""
    calls: tuple = ()
    thinking: str = ""
    call_id: str | None = None
    name: str | None = None
    is_error: bool = False
    tools: tuple = ()
    removed: tuple = ()


@dataclass(frozen=True)
class ClearThinking:
    """``clear_thinking_20251015``: the thinking of assistant turns older than
    the last ``keep`` is dropped (None: all kept). ``implicit``: the API's
    default with thinking on, not reported as an applied edit."""

    keep: int | None = 1
    implicit: bool = False
    type: str = "clear_thinking_20251015"


@dataclass(frozen=True)
class ClearToolUses:
    """``clear_tool_uses_20250919``: once the prompt passes ``trigger_tokens``
    (or the conversation ``trigger_uses`` tool uses), the oldest tool results
    but the last ``keep`` are replaced by a note (their calls' inputs too,
    with ``clear_inputs``: True, or the names listed), tools in ``exclude``
    never; applied only if it frees at least ``clear_at_least`` tokens."""

    trigger_tokens: int | None = 100_000
    trigger_uses: int | None = None
    keep: int = 3
    clear_at_least: int = 0
    exclude: tuple = ()
    clear_inputs: bool | tuple = False
    type: str = "clear_tool_uses_20250919"


# --- Requests --------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, already validated by the HTTP side."""

    messages: tuple  # Messages, or (role, text) pairs
    max_tokens: int
    # The Tools the prompt lists at its start.
    tools: tuple = ()
    # The tools the answer may call, where they differ from ``tools``: tool
    # search and tool changes load (and withdraw) tools along the
    # conversation, their definitions rendered there. None: ``tools``.
    callable_tools: tuple | None = None
    # auto | any | none | the name of the one tool to call
    tool_choice: str = "auto"
    parallel_calls: bool = True
    answer_schema: dict | None = None  # a JSON schema the text answer follows
    thinking: bool | None = None  # ask the template to think or not; None: its default
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: tuple = ()
    # The client marked parts of the prompt with cache_control: the prompt
    # tokens this request reads are reported as cache creation, not input.
    cache_hint: bool = False
    # ClearThinking / ClearToolUses, applied in order before the prompt is
    # tokenized (the API's context_management.edits).
    context_edits: tuple = ()

    @property
    def offered(self):
        """The Tools the answer may call (and the grammar allows)."""
        return self.tools if self.callable_tools is None else self.callable_tools


@dataclass(frozen=True)
class CountRequest:
    """Only count the tokens ``messages`` and ``tools`` would take as a prompt."""

    messages: tuple
    tools: tuple = ()
    context_edits: tuple = ()


# --- What comes back for a request, in order -------------------------------------


@dataclass(frozen=True)
class Accepted:
    """The prompt fits: its token count and the output budget after clamping.
    ``constrained``: the answer is decoded under a grammar."""

    input_tokens: int
    max_tokens: int
    constrained: bool = False
    # The context edits that changed the prompt, as the API reports them
    # (context_management.applied_edits): dicts.
    applied_edits: tuple = ()


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    name: str


@dataclass(frozen=True)
class ToolInputDelta:
    json: str  # a piece of the arguments' JSON text, in order


@dataclass(frozen=True)
class ToolCallEnd:
    input: dict | None  # None: the call was cut off (max_tokens, a stop sequence)


# The events of an answer's content, between Accepted and Finished.
CONTENT_EVENTS = (TextDelta, ThinkingDelta, ToolCallStart, ToolInputDelta, ToolCallEnd)


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # end_turn | max_tokens | stop_sequence | tool_use
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int
    time_to_first_token: float
    decode_tps: float
    cached_tokens: int = 0  # of input_tokens, taken from the prompt cache
    # Of input_tokens, read here and stored in the prompt cache as the client
    # asked (cache_control); the rest of those read are plain input.
    cache_created_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    kind: str  # "invalid_request" (a 400) or "internal" (a 500)
    message: str


@dataclass(frozen=True)
class Counted:
    input_tokens: int


# --- The engine, seen from outside --------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """The model an engine serves, once loaded."""

    name: str
    context_window: int
    device: str  # cpu | metal | cuda
    weights: str  # how the weights are held ("as stored", "float32 (...)")
    trained_context_window: int = 0  # the window the weights were trained on
    rope_scaling: str | None = None  # how the window is stretched past it


@dataclass(frozen=True)
class Stats:
    """What an engine is doing, as its thread last published it."""

    running: int = 0  # requests decoding
    waiting: int = 0  # accepted, waiting for the batch (or for KV memory)
    max_running: int = 0
    prompt_cache_entries: int = 0
    prompt_cache_bytes: int = 0
    prompt_cache_max_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_reserved_bytes: int = 0  # what the running requests may fill
    kv_budget_bytes: int = 0
    memory_active_bytes: int = 0  # MLX's allocator: model, caches, work buffers
    memory_peak_bytes: int = 0
    memory_buffer_cache_bytes: int = 0


@runtime_checkable
class JobLike(Protocol):
    """A submitted request; ``cancel()`` may be called from any thread."""

    def cancel(self) -> None: ...


# Called once, on the engine's thread, when loading ends: (ModelInfo, None)
# or (None, the ModelError).
OnLoaded = Callable[["ModelInfo | None", "Exception | None"], None]


@runtime_checkable
class EngineLike(Protocol):
    """What the server needs of an engine (``engine.Engine``, or a test's)."""

    def start(self, on_loaded: OnLoaded) -> None:
        """Begin loading; ``on_loaded`` reports the outcome."""

    def submit(self, request: "GenerationRequest | CountRequest",
               deliver: Callable[[object], None]) -> JobLike:
        """Queue ``request``; ``deliver(msg)`` is called with each message for it."""

    def stats(self) -> Stats:
        """The latest published snapshot; cheap, callable from any thread."""

    def stop(self, timeout: float | None = None) -> None:
        """End the engine's work; blocks up to ``timeout`` seconds."""
