"""Model configuration: frozen dataclasses parsed from a checkpoint's ``config.json``.

Two dialects of the same file exist and both are accepted:
  * released checkpoints: ``text_config.rope_scaling`` {mrope_section, ...} + ``rope_theta``,
    MoE ``num_experts``, vision ``model_type`` "qwen3_vl";
  * transformers >= 5 re-serialisation: ``rope_parameters`` {rope_theta, mrope_section, ...},
    MoE ``num_local_experts``, vision ``model_type`` "qwen3_vl_vision".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen3-VL model."""


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: missing required field '{where}.{key}'")
    return d[key]


def _first_id(value) -> int | None:
    """A token id given as an int or a list of ints (the first is taken)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # one flattened (C, T, P, P) patch
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        w = "vision_config"
        rope = d.get("rope_parameters") or {}
        return cls(
            depth=_need(d, "depth", w),
            hidden_size=_need(d, "hidden_size", w),
            intermediate_size=_need(d, "intermediate_size", w),
            num_heads=_need(d, "num_heads", w),
            out_hidden_size=_need(d, "out_hidden_size", w),
            num_position_embeddings=_need(d, "num_position_embeddings", w),
            deepstack_visual_indexes=tuple(d.get("deepstack_visual_indexes", (8, 16, 24))),
            in_channels=d.get("in_channels", 3),
            patch_size=d.get("patch_size", 16),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    eos_token_id: int | None = None  # the checkpoint's special ids (generation falls back on them)
    pad_token_id: int | None = None
    # Mixture of experts (num_experts == 0: dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` has a mixture-of-experts MLP (reference rule)."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        w = "text_config"
        # Released dialect: rope_scaling + rope_theta; transformers >= 5: rope_parameters.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ConfigError("config.json: missing required field 'text_config.rope_theta'")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json: unsupported text rope_type {rope_type!r} (only 'default')")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: unsupported text_config.hidden_act {d['hidden_act']!r} (only 'silu')")
        heads = _need(d, "num_attention_heads", w)
        hidden = _need(d, "hidden_size", w)
        section = tuple(rope.get("mrope_section", (24, 20, 20)))
        head_dim = d.get("head_dim") or hidden // heads
        if len(section) != 3 or sum(section) != head_dim // 2:
            raise ConfigError(
                f"config.json: text_config mrope_section {list(section)} must have 3 entries "
                f"summing to head_dim/2 = {head_dim // 2}"
            )
        return cls(
            vocab_size=_need(d, "vocab_size", w),
            hidden_size=hidden,
            intermediate_size=_need(d, "intermediate_size", w),
            num_hidden_layers=_need(d, "num_hidden_layers", w),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            mrope_section=section,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 262144),
            attention_bias=bool(d.get("attention_bias", False)),
            eos_token_id=_first_id(d.get("eos_token_id")),
            pad_token_id=_first_id(d.get("pad_token_id")),
            num_experts=d.get("num_experts", d.get("num_local_experts")) or 0,
            num_experts_per_tok=d.get("num_experts_per_tok") or 0,
            moe_intermediate_size=d.get("moe_intermediate_size") or 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            decoder_sparse_step=d.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
        )


@dataclass(frozen=True)
class Qwen3VLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int  # the placeholder ids the vision features replace
    video_token_id: int
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    @property
    def is_moe(self) -> bool:
        return self.text.num_experts > 0

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3VLConfig":
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"config.json: unknown model_type {model_type!r}; expected one of {list(MODEL_TYPES)}"
            )
        text_d = _need(d, "text_config", "<root>")
        vision_d = _need(d, "vision_config", "<root>")
        text = TextConfig.from_dict(text_d)
        if (model_type == "qwen3_vl_moe") != (text.num_experts > 0):
            raise ConfigError(
                f"config.json: model_type {model_type!r} but text_config num_experts={text.num_experts}"
            )
        if model_type == "qwen3_vl_moe" and not (text.num_experts_per_tok and text.moe_intermediate_size):
            raise ConfigError("config.json: MoE text_config needs num_experts_per_tok and moe_intermediate_size")
        vision = VisionConfig.from_dict(vision_d)
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"config.json: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
            )
        dtype = d.get("torch_dtype") or d.get("dtype") or text_d.get("torch_dtype") or text_d.get("dtype")
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            tie_word_embeddings=bool(tie),
            torch_dtype=dtype or "bfloat16",
            image_token_id=_need(d, "image_token_id", "<root>"),
            video_token_id=_need(d, "video_token_id", "<root>"),
        )

    @classmethod
    def from_pretrained(cls, path_or_dict: str | os.PathLike | dict) -> "Qwen3VLConfig":
        """Parse a config from a dict, a ``config.json`` file, or a checkpoint folder."""
        if isinstance(path_or_dict, dict):
            return cls.from_dict(path_or_dict)
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d)
