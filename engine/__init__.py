"""Pensieve's engine: everything that touches MLX, run on one thread.

``Engine`` owns the thread; ``GenerationRequest`` goes in, and the frozen
messages ``Accepted``, ``TextDelta``, ``Finished`` and ``Failed`` come out.
Importing this package does not import MLX.
"""

from .engine import (Accepted, Engine, Failed, Finished, GenerationRequest, Job,
                     TextDelta)
from .models import ModelError

__all__ = ["Accepted", "Engine", "Failed", "Finished", "GenerationRequest", "Job",
           "ModelError", "TextDelta"]
