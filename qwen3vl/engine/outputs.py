"""transformers-style options and outputs of ``Qwen3VL.generate``: ``generation_config`` (a dict
or an object with ``to_dict()`` / attributes, like transformers' GenerationConfig; explicit
keyword arguments win over it), ``return_dict_in_generate`` with ``output_scores`` /
``output_logits``, ``stop_strings`` with ``tokenizer``, ``pad_token_id``; ``num_beams`` > 1 is
refused, naming the supported alternatives."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Accepted and without effect here (the engine always caches; no attentions are exposed).
_NO_EFFECT = ("use_cache", "output_attentions", "output_hidden_states", "synced_gpus")


class UnsupportedGeneration(ValueError):
    """A transformers generation setting this implementation does not provide."""


def config_dict(config) -> dict:
    """A generation config (dict, GenerationConfig-like object, or None) -> a plain dict without nulls."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        d = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        d = config.to_dict()
    elif hasattr(config, "__dict__"):
        d = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    else:
        raise TypeError(f"generation_config: expected a dict or a GenerationConfig-like object, got {type(config).__name__}")
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class GenerateOptions:
    config: dict  # the checkpoint's generation_config.json updated by the call's generation_config
    return_dict: bool = False
    output_scores: bool = False
    output_logits: bool = False
    tokenizer: object = None
    pad_token_id: int | None = None

    @classmethod
    def take(cls, model, kwargs: dict) -> "GenerateOptions":
        """Remove the transformers-only options from ``kwargs`` (left: SamplingParams fields);
        ``stop_strings`` becomes ``stop``."""
        given = config_dict(kwargs.pop("generation_config", None))

        def opt(name, default=None):
            value = kwargs.pop(name, None)
            return given.get(name, default) if value is None else value

        beams = opt("num_beams", 1)
        if int(beams) > 1:
            raise UnsupportedGeneration(f"num_beams={beams}: beam search is not supported; use greedy decoding "
                                        "(do_sample=False) or sampling (do_sample=True with temperature/top_k/top_p)")
        for name in _NO_EFFECT:
            kwargs.pop(name, None)
        stops = opt("stop_strings")
        tokenizer = kwargs.pop("tokenizer", None)
        if stops is not None:
            if tokenizer is None:
                raise UnsupportedGeneration("stop_strings needs tokenizer= (the processor or its tokenizer), "
                                            "as in transformers")
            if kwargs.get("stop") is not None:
                raise UnsupportedGeneration("pass stop_strings or stop, not both")
            kwargs["stop"] = stops
        config = {**model.generation_config, **given}
        return cls(config, bool(opt("return_dict_in_generate", False)), bool(opt("output_scores", False)),
                   bool(opt("output_logits", False)), getattr(tokenizer, "tokenizer", tokenizer),
                   kwargs.pop("pad_token_id", None))


@dataclass
class GenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: as transformers' GenerateDecoderOnlyOutput.
    ``scores`` / ``logits``: one (B, V) float32 tensor per generated step (the processed scores
    each row chose from, or the raw logits); a row that has already finished gets -inf everywhere
    but 0 at the pad id (the token it is given)."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: None = None
    attentions: None = None
    hidden_states: None = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self):
        return [k for k in ("sequences", "scores", "logits") if getattr(self, k) is not None]


@dataclass
class ScoreRecorder:
    """Collects each row's per-step processed scores (and raw logits) from the engine's hook."""

    rows: dict  # request id -> batch row
    raw: bool = False
    scores: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def __post_init__(self):
        self.scores = [[] for _ in self.rows]
        self.logits = [[] for _ in self.rows]

    def __call__(self, reqs, logits: torch.Tensor, processed: torch.Tensor) -> None:
        for j, req in enumerate(reqs):
            i = self.rows.get(req.id)
            if i is not None:
                self.scores[i].append(processed[j].float().clone())
                if self.raw:
                    self.logits[i].append(logits[j].float().clone())

    @staticmethod
    def _steps(per_row: list, steps: int, pad: int) -> tuple[torch.Tensor, ...]:
        v = next(len(r[0]) for r in per_row if r)
        filler = torch.full((v,), float("-inf"))
        filler[pad] = 0.0
        dev = next(r[0].device for r in per_row if r)
        filler = filler.to(dev)
        return tuple(torch.stack([r[k] if k < len(r) else filler for r in per_row]) for k in range(steps))

    def outputs(self, steps: int, pad: int):
        if steps == 0:
            return (), ()
        return self._steps(self.scores, steps, pad), (self._steps(self.logits, steps, pad) if self.raw else None)
