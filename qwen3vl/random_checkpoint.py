"""Write random-weight checkpoints in the RELEASED layout (tests, benchmarks, the demo).

The tensor names and shapes come from the loader's own name table, so a checkpoint written here
has exactly the layout of a published Qwen3-VL folder: separate q/k/v and gate/up tensors,
experts as (E, hidden, 2I) / (E, I, hidden), no ``lm_head.weight`` when embeddings are tied.
"""
from __future__ import annotations

import json
import os

import torch

from .config import Qwen3VLConfig
from .model.qwen3vl import Qwen3VLModel
from .weights import checkpoint_shapes

TINY_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 5000000,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "float32",
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1, 2],
        "hidden_act": "gelu_pytorch_tanh",
    },
    "dtype": "float32",
}

def _tiny_moe_config() -> dict:
    """TINY_CONFIG as a mixture-of-experts model. hidden (64) differs from 2 * moe_intermediate
    (96) and from moe_intermediate (48), so a transposed expert layout cannot load by accident;
    layer 1 stays dense through ``mlp_only_layers``."""
    import copy

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    cfg["model_type"] = "qwen3_vl_moe"
    cfg["vision_config"]["model_type"] = "qwen3_vl_moe"
    cfg["text_config"].update(
        model_type="qwen3_vl_moe_text", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])
    return cfg


TINY_MOE_CONFIG = _tiny_moe_config()

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
}


def random_tensors(config: dict, seed: int = 0, dtype=torch.float32, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Released-layout tensor name -> random tensor for a config dict."""
    meta = Qwen3VLModel.from_config(config, device="meta")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(meta).items():
        if len(shape) == 1 and ("norm" in name.rsplit(".", 2)[-2]):
            # Norm scales near 1 keep activations in a realistic range.
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        out[name] = t.to(dtype).contiguous()
    return out


def write_checkpoint(path: str, config: dict, tensors: dict[str, torch.Tensor], shards: int = 1,
                     generation_config: dict | None = GENERATION_CONFIG) -> str:
    """Save config.json (+ generation_config.json) and the tensors as one file or ``shards`` shards."""
    from safetensors.torch import save_file

    Qwen3VLConfig.from_dict(config)  # fail early on a bad config
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config, f, indent=2)
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n] for n in names}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map, per = {}, -(-len(names) // shards)
    for i in range(shards):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * per : (i + 1) * per]
        save_file({n: tensors[n] for n in part}, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path


def write_random_checkpoint(path: str, config: dict | None = None, seed: int = 0, dtype=torch.float32,
                            shards: int = 1) -> str:
    config = config or TINY_CONFIG
    return write_checkpoint(path, config, random_tensors(config, seed, dtype), shards)
