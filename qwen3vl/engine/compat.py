"""Drop-in names for code written against ``transformers`` (the Qwen3-VL README and model docs):

    from qwen3vl import AutoProcessor, Qwen3VLForConditionalGeneration   # instead of transformers'
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype="auto", device_map="auto")

The classes are ``qwen3vl.Qwen3VL`` (the model with ``generate``) with transformers'
``from_pretrained`` arguments: ``dtype`` / ``torch_dtype``, ``device_map`` ("auto", "cpu", "cuda",
"cuda:N", a torch.device or index, or {"": device}: the whole model goes on one device),
``attn_implementation`` (None, "sdpa" or "eager": the same results; anything else is refused,
naming those). ``Qwen3VLForConditionalGeneration`` takes dense checkpoints,
``Qwen3VLMoeForConditionalGeneration`` MoE ones, ``AutoModelForImageTextToText`` either.
"""
from __future__ import annotations

import os

import torch

from ..config import Qwen3VLConfig
from ..model.qwen3vl import resolve_model_path
from ..processor import Processor
from .hf import Qwen3VL

AutoProcessor = Processor

ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager")
# transformers loading options that change nothing here (where and how the weights are read).
_IGNORED = frozenset({"trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "local_files_only",
                      "revision", "cache_dir", "token", "force_download", "offload_folder", "max_memory"})


class CompatError(ValueError):
    """An argument this implementation does not support, or a checkpoint of the other family."""


def resolve_device_map(device_map) -> torch.device:
    """transformers' ``device_map`` -> the one device the model goes on."""
    if device_map is None or device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise CompatError(f"device_map {device_map!r}: only a whole-model map {{'': device}} is supported "
                              "(the model runs on one device)")
        device_map = device_map[""]
    try:
        is_index = isinstance(device_map, int) and not isinstance(device_map, bool)
        device = torch.device("cuda", device_map) if is_index else torch.device(device_map)
    except (RuntimeError, TypeError) as e:
        raise CompatError(f"device_map {device_map!r}: not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' "
                          "or {'': device}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompatError(f"device_map {device_map!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return device


def resolve_dtype_args(dtype, torch_dtype):
    """``dtype`` and its older spelling ``torch_dtype``; "auto" (the checkpoint's) when neither."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise CompatError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    return dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto")


def check_attn_implementation(attn_implementation) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise CompatError(f"attn_implementation={attn_implementation!r} is not supported; use one of "
                          f"{list(ATTN_IMPLEMENTATIONS)} (they give the same results here)")


class _Compat(Qwen3VL):
    moe: bool | None = None  # True: MoE checkpoints only, False: dense only, None: either

    @classmethod
    def from_pretrained(cls, path, *args, dtype=None, torch_dtype=None, device_map=None,
                        attn_implementation=None, quantization=None, progress=None, **kwargs) -> "_Compat":
        """transformers-style loading (see the module doc); ``quantization`` ("int8"/"int4") and
        ``progress`` as in ``qwen3vl.Qwen3VL.from_pretrained``."""
        if args:
            raise CompatError(f"{cls.__name__}.from_pretrained takes the path and keyword arguments only")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise CompatError(f"{cls.__name__}.from_pretrained: unsupported argument(s) {unknown}")
        check_attn_implementation(attn_implementation)
        device = resolve_device_map(device_map)
        path = resolve_model_path(os.fspath(path))
        config = Qwen3VLConfig.from_pretrained(path)
        if cls.moe is not None and config.is_moe != cls.moe:
            kind, other = ("a MoE", "Qwen3VLMoeForConditionalGeneration") if config.is_moe else \
                ("a dense", "Qwen3VLForConditionalGeneration")
            raise CompatError(f"{path} is {kind} checkpoint (model_type {config.model_type!r}); load it with "
                              f"{other} or AutoModelForImageTextToText")
        model = super().from_pretrained(path, dtype=resolve_dtype_args(dtype, torch_dtype), device=device,
                                        progress=progress, quantization=quantization)
        model.name_or_path = path
        return model


class Qwen3VLForConditionalGeneration(_Compat):
    moe = False


class Qwen3VLMoeForConditionalGeneration(_Compat):
    moe = True


class AutoModelForImageTextToText(_Compat):
    moe = None
