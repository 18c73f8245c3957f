"""Pensieve's engine: everything that touches MLX, run on one thread.

``Engine`` owns the thread; a ``GenerationRequest`` goes in and the frozen
messages ``Accepted``, then ``TextDelta``, ``ThinkingDelta`` and tool-call
events (``ToolCallStart``, ``ToolInputDelta``, ``ToolCallEnd``), then
``Finished`` or ``Failed`` come out; a ``CountRequest`` gets ``Counted`` (or
``Failed``). Importing this package does not import MLX.
"""

from .engine import (Accepted, CountRequest, Counted, Engine, Failed, Finished,
                     GenerationRequest, Job)
from .models import DEFAULT_ROPE_SCALING, ROPE_SCALINGS, ModelError
from .text import ClearThinking, ClearToolUses, Message
from .tools import TextDelta, ThinkingDelta, ToolCallEnd, ToolCallStart, ToolInputDelta

__all__ = ["Accepted", "ClearThinking", "ClearToolUses", "DEFAULT_ROPE_SCALING", "CountRequest", "Counted", "Engine", "Failed", "Finished",
           "GenerationRequest", "Job", "Message", "ModelError", "ROPE_SCALINGS", "TextDelta",
           "ThinkingDelta", "ToolCallEnd", "ToolCallStart", "ToolInputDelta"]
