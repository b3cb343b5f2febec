"""Build and load one rank's shard of a checkpoint: the model is built on the meta device,
quantized (``qwen3vl.quant``, still meta), sharded (``shard.py`` / ``moe.py``), then only this
rank's parts are allocated and the checkpoint streams in one tensor at a time, each sharded
module keeping its slice. Rank 0 also holds the token embedding and the vision encoder; the
other ranks leave them on the meta device and skip their tensors (validated, never read).
No rank ever holds the full model; the transient peak is one checkpoint tensor (the loader's
scratch buffer).
"""
from __future__ import annotations

import os

import torch

from .. import quant
from ..config import Qwen3VLConfig
from ..model.qwen3vl import resolve_dtype, resolve_model_path
from ..model.text import SparseMoE
from ..weights import load_checkpoint, name_table
from .moe import ParallelMoE
from .shard import EmbeddingSink, ShardPlan, shard_attention, shard_head, shard_mlp


def shard_model(model, plan: ShardPlan) -> None:
    """Replace the text decoder's projections, MoE blocks and lm_head by this rank's shards
    (meta device, before loading)."""
    cfg = model.config
    if cfg.text.attention_bias:
        raise ValueError("tensor parallel does not support attention_bias=True (no released Qwen3-VL has it)")
    lm = model.model.language_model
    for layer in lm.layers:
        shard_attention(layer.self_attn, plan)
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp = ParallelMoE(layer.mlp, plan)
        else:
            shard_mlp(layer.mlp, plan)
    model.lm_head = shard_head(model.lm_head, plan)
    if plan.rank != 0:
        tied = model.lm_head if cfg.tie_word_embeddings else None
        lm.embed_tokens = EmbeddingSink(cfg.text.vocab_size, cfg.text.hidden_size, lm.norm.weight.dtype, tied)


def _skipped(cfg: Qwen3VLConfig, plan: ShardPlan) -> frozenset[str]:
    """Checkpoint tensors this rank does not read: on ranks > 0 the vision encoder, and the
    token embedding unless the lm_head is tied to it."""
    if plan.rank == 0:
        return frozenset()
    names = {n for n in name_table(cfg) if n.startswith("model.visual.")}
    if not cfg.tie_word_embeddings:
        names.add("model.language_model.embed_tokens.weight")
    return frozenset(names)


def load_shard(cls, path: str, plan: ShardPlan, dtype="auto", quantization: str | None = None,
               group_size: int = 64, rope_scaling=None, progress: bool | None = None):
    """``cls.from_pretrained`` for one rank of a tensor-parallel group (CPU; weights copied into
    memory, not memory-mapped: a shard is not a contiguous range of the checkpoint file)."""
    path = resolve_model_path(os.fspath(path))
    config = Qwen3VLConfig.from_pretrained(path).with_rope_scaling(rope_scaling)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = cls(config).to(dtype)
    if quantization:
        quant.quantize_modules(model, quantization, group_size)
    shard_model(model, plan)
    if plan.rank == 0:
        model.to_empty(device="cpu")  # not materialize(): it would re-tie the lm_head to the full table
    else:
        model.model.language_model.to_empty(device="cpu")
        model.lm_head.to_empty(device="cpu")
    load_checkpoint(model, path, progress=progress if plan.rank == 0 else False, skip=_skipped(config, plan))
    if plan.rank == 0 and config.tie_word_embeddings:
        with torch.no_grad():
            model.lm_head.load_weight(None, model.model.language_model.embed_tokens.weight)
    return model.finish_loading(path, quantization)


def parallel_parts(model) -> dict[str, int]:
    """Bytes of this rank's tensors: sharded decoder + head, and what it holds whole."""
    out = {"sharded": 0, "replicated": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            continue
        sharded = ".layers." in name and not name.endswith("norm.weight") and ".mlp.gate.weight" not in name
        sharded = sharded or name.startswith("lm_head.")
        out["sharded" if sharded else "replicated"] += t.numel() * t.element_size()
    return out
