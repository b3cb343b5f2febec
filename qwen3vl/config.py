"""Model configuration: frozen dataclasses parsed from a checkpoint's ``config.json``.

Two dialects of the same file exist and both are accepted:
  * released checkpoints: ``text_config.rope_scaling`` {mrope_section, ...} + ``rope_theta``,
    MoE ``num_experts``, vision ``model_type`` "qwen3_vl";
  * transformers >= 5 re-serialisation: ``rope_parameters`` {rope_theta, mrope_section, ...},
    MoE ``num_local_experts``, vision ``model_type`` "qwen3_vl_vision".
"""
from __future__ import annotations

import dataclasses
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


ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters of the text rotary embedding (``rope_scaling`` / ``rope_parameters`` with
    ``rope_type: "yarn"``), with the pinned reference's defaults (transformers
    ``_compute_yarn_parameters``): ``factor`` missing -> max_position_embeddings / original;
    ``original_max_position_embeddings`` missing -> max_position_embeddings; beta_fast 32,
    beta_slow 1, ``truncate`` true; ``attention_factor`` None -> derived from ``factor`` (and
    ``mscale`` / ``mscale_all_dim`` when both are given), see ``qwen3vl.model.rope.yarn``."""

    factor: float
    original_max_position_embeddings: int
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"

    @classmethod
    def from_dict(cls, rope: dict, max_position_embeddings: int) -> "RopeScaling | None":
        """``rope``: the text config's rope dict (or a ``--rope-scaling`` override) -> None for
        plain RoPE, else the YaRN parameters. Unknown types and bad values: ConfigError."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported text rope_type {rope_type!r}; supported: {list(ROPE_TYPES)}")
        if rope_type == "default":
            return None
        original = rope.get("original_max_position_embeddings") or max_position_embeddings
        factor = rope.get("factor")
        factor = max_position_embeddings / original if factor is None else factor
        for name, value in (("factor", factor), ("original_max_position_embeddings", original)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"rope_scaling {name} must be a positive number, got {value!r}")
        if factor < 1:
            raise ConfigError(f"rope_scaling factor must be >= 1 for yarn, got {factor}")
        opt = {k: float(rope[k]) for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None}
        return cls(factor=float(factor), original_max_position_embeddings=int(original),
                   beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                   truncate=bool(rope.get("truncate", True)), **opt)


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
    rope_scaling: "RopeScaling | None" = None  # YaRN; None: plain RoPE ("default")

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
        max_pos = d.get("max_position_embeddings", 262144)
        scaling = RopeScaling.from_dict(rope, max_pos)
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
            max_position_embeddings=max_pos,
            rope_scaling=scaling,
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


FP8_FORMATS, FP8_BLOCK_SIZES, FP8_ACTIVATION_SCHEMES = ("e4m3",), ((128, 128),), ("dynamic",)


@dataclass(frozen=True)
class QuantizationConfig:
    """``quantization_config`` of a pre-quantized checkpoint. Only the released ``-FP8`` scheme is
    known: fine-grained e4m3 weights in 128x128 blocks with per-block ``weight_scale_inv``,
    activations quantized on the fly; ``modules_to_not_convert`` lists modules left unquantized
    (transformers' matching rules: see ``qwen3vl.fp8.excluded``)."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, q: dict) -> "QuantizationConfig":
        if not isinstance(q, dict):
            raise ConfigError(f"config.json: quantization_config must be an object, got {type(q).__name__}")
        method = q.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"config.json: unsupported quantization_config.quant_method {method!r}; "
                              "supported: ['fp8'] (fine-grained FP8, the -FP8 releases)")
        fmt = q.get("fmt") or "e4m3"
        if fmt not in FP8_FORMATS:
            raise ConfigError(f"config.json: unsupported FP8 fmt {fmt!r}; supported: {list(FP8_FORMATS)}")
        block = q.get("weight_block_size")
        if not isinstance(block, (list, tuple)) or tuple(block) not in FP8_BLOCK_SIZES:
            raise ConfigError(f"config.json: unsupported FP8 weight_block_size {block!r}; supported: "
                              f"{[list(b) for b in FP8_BLOCK_SIZES]} (per-tensor scales are not supported)")
        scheme = q.get("activation_scheme") or "dynamic"
        if scheme not in FP8_ACTIVATION_SCHEMES:
            raise ConfigError(f"config.json: unsupported FP8 activation_scheme {scheme!r}; "
                              f"supported: {list(FP8_ACTIVATION_SCHEMES)}")
        skip = q.get("modules_to_not_convert") or ()
        if not isinstance(skip, (list, tuple)) or not all(isinstance(m, str) for m in skip):
            raise ConfigError(f"config.json: quantization_config.modules_to_not_convert must be a list of "
                              f"module names, got {skip!r}")
        return cls(fmt=fmt, weight_block_size=tuple(block), activation_scheme=scheme,
                   modules_to_not_convert=tuple(skip))


def _quantization(q) -> QuantizationConfig | None:
    return None if q is None else QuantizationConfig.from_dict(q)


@dataclass(frozen=True)
class Qwen3VLConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int  # the placeholder ids the vision features replace
    video_token_id: int
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quantization: QuantizationConfig | None = None  # a pre-quantized (-FP8) checkpoint

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
            quantization=_quantization(d.get("quantization_config", text_d.get("quantization_config"))),
        )

    def with_rope_scaling(self, rope_scaling: dict | str | None) -> "Qwen3VLConfig":
        """This config with the text rotary scaling replaced by ``rope_scaling`` (a dict or its
        JSON, vLLM's ``--rope-scaling``: e.g. ``{"rope_type": "yarn", "factor": 3.0,
        "original_max_position_embeddings": 262144}``); the interleaved MRoPE layout
        (``mrope_section``) is kept. None: unchanged; ``{"rope_type": "default"}``: plain RoPE."""
        if rope_scaling is None:
            return self
        if isinstance(rope_scaling, str):
            try:
                rope_scaling = json.loads(rope_scaling)
            except json.JSONDecodeError as e:
                raise ConfigError(f"rope_scaling: not valid JSON ({e})") from e
        if not isinstance(rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be a JSON object, got {type(rope_scaling).__name__}")
        scaling = RopeScaling.from_dict(rope_scaling, self.text.max_position_embeddings)
        return dataclasses.replace(self, text=dataclasses.replace(self.text, rope_scaling=scaling))

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
