"""Pensieve's engine: everything that touches MLX, run on one thread.

``Engine`` owns the thread (and the prompt threads that tokenize prompts
and answer counts without MLX); a ``GenerationRequest`` goes in and the frozen
messages ``Accepted``, then ``TextDelta``, ``ThinkingDelta`` and tool-call
events (``ToolCallStart``, ``ToolInputDelta``, ``ToolCallEnd``), then
``Finished`` or ``Failed`` come out; a ``CountRequest`` gets ``Counted`` (or
``Failed``). Every type that crosses is defined in engine/messages.py and
re-exported here. Importing this package does not import MLX.

The modules: messages.py (the types that cross), prompts.py (the prompt
threads: rendering, tokenizing, the window check, counts), engine.py (the
thread, taking requests in, scheduling, the prompt cache), runners.py (solo
and batched runs: every model call), slot.py (a request's output pipeline,
the model's output style), text.py (prompts, context edits, untrusted text,
stop sequences), tools.py
(call formats, the output parser, grammars), grammar.py (llguidance),
models.py (finding and loading models), attention.py, gguf.py, progress.py.
"""

from .engine import DEFAULT_MAX_RUNNING, Engine, Job
from .messages import (CONTENT_EVENTS, Accepted, ClearThinking, ClearToolUses, Counted,
                       CountRequest, EngineLike, Failed, Finished, GenerationRequest,
                       JobLike, Message, ModelInfo, OnLoaded, Stats, TextDelta,
                       ThinkingDelta, Tool, ToolCallEnd, ToolCallStart, ToolInputDelta)
from .models import DEFAULT_ROPE_SCALING, ROPE_SCALINGS, ModelError

__all__ = ["CONTENT_EVENTS", "DEFAULT_MAX_RUNNING", "DEFAULT_ROPE_SCALING", "ROPE_SCALINGS",
           "Accepted", "ClearThinking", "ClearToolUses", "CountRequest", "Counted",
           "Engine", "EngineLike", "Failed", "Finished", "GenerationRequest", "Job",
           "JobLike", "Message", "ModelError", "ModelInfo", "OnLoaded", "Stats",
           "TextDelta", "ThinkingDelta", "Tool", "ToolCallEnd", "ToolCallStart",
           "ToolInputDelta"]
