"""Pensieve's engine: everything that touches MLX, run on one thread.

``Engine`` owns the thread; a ``GenerationRequest`` goes in and the frozen
messages ``Accepted``, ``TextDelta``, ``Finished`` or ``Failed`` come out; a
``CountRequest`` gets ``Counted`` (or ``Failed``). Importing this package does
not import MLX.
"""

from .engine import (Accepted, CountRequest, Counted, Engine, Failed, Finished,
                     GenerationRequest, Job, TextDelta)
from .models import ModelError

__all__ = ["Accepted", "CountRequest", "Counted", "Engine", "Failed", "Finished",
           "GenerationRequest", "Job", "ModelError", "TextDelta"]
