"""Typed errors of the engine's API, so that callers (the HTTP server, the CLI) can tell them apart
by type, never by message text. Both are ``ValueError``s: code that only knows the generic
contract ("bad input raises ValueError") still catches them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


class PromptTooLong(ValueError):
    """A prompt that leaves no room for even one generated token within ``max_model_len``."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__(f"prompt has {prompt_tokens} tokens; the maximum model length is {limit}")


class InvalidParameter(ValueError):
    """A sampling setting out of its range; ``param`` is the ``SamplingParams`` field.

    ``str(e)`` reads "SamplingParams.top_p must be in (0, 1], got 0"; ``describe(names)`` says the
    same in a caller's own words (e.g. the OpenAI request field ``max_tokens`` for
    ``max_new_tokens``).
    """

    def __init__(self, param: str, rule: str, value: Any):
        self.param, self.rule, self.value = param, rule, value
        super().__init__(f"SamplingParams.{param} {rule}, got {value!r}")

    def describe(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each field named as ``names`` maps it (fields not in it keep theirs)."""
        names = names or {}
        rule = self.rule
        if names:  # the rule may mention another field, e.g. "in [0, max_new_tokens=4]"
            pattern = r"\b(" + "|".join(map(re.escape, names)) + r")\b"
            rule = re.sub(pattern, lambda m: names[m[1]], rule)
        return f"{names.get(self.param, self.param)} {rule}, got {self.value!r}"


class ConstraintError(ValueError):
    """A structured-output request (``response_format``, ``tool_choice``) that cannot be enforced."""

    def __init__(self, param: str, reason: str):
        self.param, self.reason = param, reason
        super().__init__(f"{param}: {reason}")


__all__ = ["PromptTooLong", "InvalidParameter", "ConstraintError"]
