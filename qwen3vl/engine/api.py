"""The engine's public API: everything a layer above (the HTTP server, the CLI) may use.

``LLM`` loads a checkpoint and owns an ``Engine``; the server builds requests with
``LLM.request`` / ``LLM.prompt_request`` / ``Engine.new_request``, hands them to
``Engine.submit`` with a listener, ``Engine.cancel``s them when the client goes away and reads
``Engine.stats()``. Bad input raises ``PromptTooLong`` / ``InvalidParameter`` (or the
processor's ``MediaError``), a structured-output request that cannot be enforced
``ConstraintError``, all ``ValueError``s.
"""
from __future__ import annotations

from .engine import Engine, EngineStats
from .errors import ConstraintError, InvalidParameter, PromptTooLong
from .llm import LLM
from .request import ChatResult, Delta, Request, Usage
from .sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "EngineStats", "Request", "Delta", "ChatResult", "Usage", "SamplingParams",
           "PromptTooLong", "InvalidParameter", "ConstraintError"]
