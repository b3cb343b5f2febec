"""``SamplingParams``: one request's sampling and stopping settings, validated on creation.

Stop token ids come from the checkpoint: ``stop_token_ids=None`` (the default) means "the
model's end-of-sequence ids", which the engine fills in from generation_config.json, config.json
or the tokenizer (``checkpoint_stop_ids``). ``FALLBACK_STOP_TOKEN_IDS`` is the last resort, used
only where none of those names an id (or a bare ``SamplingParams`` meets no checkpoint).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InvalidParameter

# Last resort only (see the module docstring): <|im_end|> and <|endoftext|>, the eos_token_id list
# of every released Qwen3-VL checkpoint's generation_config.json.
FALLBACK_STOP_TOKEN_IDS = (151645, 151643)

# generation_config.json key -> SamplingParams field.
_CONFIG_KEYS = {
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "max_new_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens",
    "eos_token_id": "stop_token_ids",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise InvalidParameter(name, rule, value)


def _as_ids(value: Any) -> tuple[int, ...] | None:
    """An id, a list of ids or None -> a tuple of ids (None stays None)."""
    if value is None:
        return None
    return (value,) if _is_int(value) else tuple(value)


def checkpoint_stop_ids(*candidates: Any) -> tuple[int, ...]:
    """The first candidate that names any id (an int or a list of ints, e.g. generation_config's
    eos_token_id, then config.json's, then the tokenizer's), else ``FALLBACK_STOP_TOKEN_IDS``."""
    for candidate in candidates:
        ids = _as_ids(candidate)
        if ids:
            return ids
    return FALLBACK_STOP_TOKEN_IDS

# The official README's recommended settings per variant ("Generation Hyperparameters", VL models),
# used where the checkpoint's generation_config.json says nothing (it wins where it does).
INSTRUCT_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5,
                     "max_new_tokens": 16384}
THINKING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.0,
                     "max_new_tokens": 40960}


def variant_defaults(thinking: bool, generation_config: Mapping[str, Any] | None) -> dict:
    """The generation config a request starts from: the variant's defaults, then the checkpoint's file."""
    return {**(THINKING_DEFAULTS if thinking else INSTRUCT_DEFAULTS), **(generation_config or {})}


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings of one request.

    ``top_k`` 0 (or -1, stored as 0), ``top_p`` 1, ``min_p`` 0, ``repetition_penalty`` 1 and presence / frequency
    penalty 0 disable the corresponding step. ``repetition_penalty`` follows HF (over prompt and generated tokens,
    positive logits divided, negative ones multiplied); ``presence_penalty`` / ``frequency_penalty`` follow OpenAI /
    vLLM (over generated tokens only: ``logit -= presence * (count > 0) + frequency * count``). ``stop`` accepts a
    string or a sequence of strings; ``stop_token_ids`` an int or a sequence of ints, or None for the checkpoint's
    end-of-sequence ids (``()``: no stop token at all). An invalid value raises ``InvalidParameter``.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalise in place (the dataclass is frozen) so equal settings compare and hash equal.
        object.__setattr__(self, "stop_token_ids", _as_ids(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _require(isinstance(self.do_sample, bool), "do_sample", "must be a bool", self.do_sample)
        _require(_is_real(self.temperature) and self.temperature >= 0, "temperature",
                 "must be >= 0 (0 means greedy)", self.temperature)
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an int >= 1, or 0 / -1 to disable",
                 self.top_k)
        _require(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _require(_is_real(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                 "must be > 0 (1 disables it)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _require(self.seed is None or _is_int(self.seed), "seed", "must be an int or None", self.seed)
        _require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "must be an int >= 1",
                 self.max_new_tokens)
        _require(_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
                 "min_new_tokens", f"must be an int in [0, max_new_tokens={self.max_new_tokens}]",
                 self.min_new_tokens)
        _require(all(_is_int(i) and i >= 0 for i in self.stop_token_ids or ()), "stop_token_ids",
                 "must be non-negative ints", self.stop_token_ids)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> SamplingParams:
        """Defaults from a ``generation_config.json`` dict, then per-call ``overrides`` (field names).

        Keys used from ``config``: do_sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens,
        min_new_tokens and eos_token_id (int or list, becomes ``stop_token_ids``); other keys are ignored. Null
        values, in the config or as overrides, keep the default, so optional request fields can be passed through.
        """
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        config = config or {}
        values = {name: config[key] for key, name in _CONFIG_KEYS.items() if config.get(key) is not None}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The stop token ids in force: ``stop_token_ids``, or the last resort where it was left unset."""
        return FALLBACK_STOP_TOKEN_IDS if self.stop_token_ids is None else self.stop_token_ids

    def with_default_stops(self, stop_token_ids: tuple[int, ...]) -> SamplingParams:
        """These settings with ``stop_token_ids`` (the checkpoint's) filled in if they were left unset."""
        return self if self.stop_token_ids is not None else replace(self, stop_token_ids=stop_token_ids)


__all__ = ["SamplingParams", "checkpoint_stop_ids", "variant_defaults", "FALLBACK_STOP_TOKEN_IDS"]
