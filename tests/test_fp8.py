"""Fine-grained FP8 checkpoints (the -FP8 releases): tiny FP8 checkpoints written here with the
block-quantization formula load with the exact dequantized weights, give the reference's logits and
greedy tokens, quantize to int8/int4 bit-exactly as the same values in fp32 do, and unsupported
configurations fail with messages naming the value.

The oracle: transformers' own FP8 loader (on CPU it dequantizes into the requested dtype) for the
dense tile-aligned checkpoint; for partial edge tiles and per-expert MoE tensors, where the pinned
loader is wrong or cannot load (see test_reference_fp8_loader_mishandles_a_partial_tile_after_a_full_one),
the reference runs the DEQUANTIZED checkpoint, written with the same formula.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import qwen3vl
from conftest import fresh_home
from model_inputs import Builder, batch, mm_token_type_ids
from qwen3vl.config import ConfigError, Qwen3VLConfig
from qwen3vl.fp8 import Fp8Error, excluded
from qwen3vl.quant import _Quantized
from qwen3vl.random_checkpoint import GENERATION_CONFIG, TINY_CONFIG, TINY_MOE_CONFIG, random_tensors
from test_generate_parity import assert_greedy_matches_reference

TOL = 1e-5
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "fp8", "Qwen3-VL-8B-Instruct-FP8.quantization_config.json")
SKIP = ["lm_head", "model.visual", "mlp.gate"]  # what the releases leave in bf16 (router: "mlp.gate")


def qconfig(**over) -> dict:
    with open(FIXTURE, encoding="utf-8") as f:
        q = json.load(f)
    q.update(modules_to_not_convert=list(SKIP))
    q.update(over)
    return q


def fp8_config(base: dict, text: dict, vision_out: int, **root) -> dict:
    cfg = copy.deepcopy(base)
    cfg["text_config"].update(text)
    cfg["vision_config"]["out_hidden_size"] = vision_out
    cfg["quantization_config"] = qconfig()
    cfg.update(root)
    return cfg


# hidden 128, q 256, kv 128, MLP 256: every dimension a multiple of 128.
ALIGNED = fp8_config(TINY_CONFIG, dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       intermediate_size=256, rope_scaling={"mrope_interleaved": True,
                                       "mrope_section": [12, 10, 10], "rope_type": "default"}), 128)
# hidden 192 = 128 + 64, q 192, kv 64, MLP 320 = 2 x 128 + 64: a partial tile after full ones.
EDGE = fp8_config(TINY_CONFIG, dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                                    intermediate_size=320, rope_scaling={"mrope_interleaved": True,
                                    "mrope_section": [12, 10, 10], "rope_type": "default"}), 192)
# MoE: 4 experts of 160 = 128 + 32 (partial tiles both ways with hidden 192); layer 1 dense.
MOE = fp8_config(TINY_MOE_CONFIG, dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64,
                                       intermediate_size=320, num_experts=4, moe_intermediate_size=160,
                                       rope_scaling={"mrope_interleaved": True, "mrope_section": [12, 10, 10],
                                                     "rope_type": "default"}), 192)
MOE["quantization_config"]["modules_to_not_convert"] = ["lm_head", "mlp.gate"]  # the vision tower in FP8 too


# ------------------------------------------------------------------ writing FP8 checkpoints
def quantize_blocks(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-quantization formula: per 128x128 tile, scale = amax / 448, fp8 = (w / scale)
    as float8_e4m3fn, weight_scale_inv = scale (rounded to ``scale_dtype`` first, so the stored
    scale is the one divided by)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-n // 128), -(-k // 128), dtype=scale_dtype)
    for i in range(0, n, 128):
        for j in range(0, k, 128):
            tile = w[i : i + 128, j : j + 128].float()
            scale = (tile.abs().amax().clamp(min=1e-12) / 448).to(scale_dtype)
            s[i // 128, j // 128] = scale
            q[i : i + 128, j : j + 128] = (tile / scale.float()).to(torch.float8_e4m3fn)
    return q, s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``fp8.float() * scale``, each scale spread over its (possibly partial) tile."""
    n, k = q.shape
    full = s.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return q.float() * full


def per_expert(tensors: dict, cfg: dict) -> dict:
    """Fused released experts -> one (N, K) tensor per expert and projection (the FP8 layout)."""
    out, inter = {}, cfg["text_config"]["moe_intermediate_size"]
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, H, 2I)
            p = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = t[e, :, :inter].t().contiguous()
                out[f"{p}{e}.up_proj.weight"] = t[e, :, inter:].t().contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # (E, I, H)
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            out[name] = t
    return out


def fused(tensors: dict, cfg: dict) -> dict:
    """Per-expert tensors back to the released fused stacks (for the reference)."""
    out, experts = {}, cfg["text_config"].get("num_experts", 0)
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            out[name] = t
        elif name.endswith("0.gate_proj.weight"):
            p = name[: -len("0.gate_proj.weight")]
            out[p + "gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}{e}.gate_proj.weight"],
                                                              tensors[f"{p}{e}.up_proj.weight"]]).t()
                                                   for e in range(experts)])
            out[p + "down_proj"] = torch.stack([tensors[f"{p}{e}.down_proj.weight"].t() for e in range(experts)])
    return out


def to_fp8(tensors: dict, cfg: dict, scale_dtype) -> tuple[dict, dict]:
    """-> (FP8 checkpoint tensors, the same weights dequantized, fp32): every 2-D ``.weight``
    outside modules_to_not_convert and the embeddings becomes FP8 + ``weight_scale_inv``."""
    skip = cfg["quantization_config"]["modules_to_not_convert"]
    q8, deq = {}, {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if (t.dim() == 2 and name.endswith(".weight") and "embed" not in name  # embed_tokens, pos_embed
                and not excluded(module, skip)):
            q, s = quantize_blocks(t, scale_dtype)
            q8[name], q8[name + "_scale_inv"], deq[name] = q, s, dequantize_blocks(q, s)
        else:
            q8[name] = deq[name] = t
    return q8, deq


def write(path: str, cfg: dict, tensors: dict, split_scales: bool = False) -> str:
    """config.json + tensors; ``split_scales``: two shards, every weight in one and its scale in
    the other (half the weights in the first file, their scales in the second, and vice versa:
    weights arrive both before and after their scales)."""
    os.makedirs(path, exist_ok=True)
    for fn, data in (("config.json", cfg), ("generation_config.json", GENERATION_CONFIG)):
        with open(os.path.join(path, fn), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if not split_scales:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    shard, weight_map = {}, {}
    for i, name in enumerate(sorted(n for n in tensors if not n.endswith("_scale_inv"))):
        shard[name] = i % 2
        if name + "_scale_inv" in tensors:
            shard[name + "_scale_inv"] = 1 - i % 2
    for k in (0, 1):
        fn = f"model-0000{k + 1}-of-00002.safetensors"
        part = {n: tensors[n] for n in tensors if shard[n] == k}
        save_file(part, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def make_pair(tmp, name: str, cfg: dict, scale_dtype, seed: int, split_scales=False, std=0.05) -> tuple[str, str, dict]:
    """-> (FP8 checkpoint, its dequantized fp32 twin in the released layout, FP8 tensors)."""
    tensors = random_tensors(cfg, seed=seed, std=std)
    moe = cfg["text_config"].get("num_experts", 0) > 0
    q8, deq = to_fp8(per_expert(tensors, cfg) if moe else tensors, cfg, scale_dtype)
    plain = copy.deepcopy(cfg)
    del plain["quantization_config"]
    fp8_path = write(str(tmp / f"{name}-FP8"), cfg, q8, split_scales)
    deq_path = write(str(tmp / f"{name}-dequantized"), plain, fused(deq, cfg) if moe else deq)
    return fp8_path, deq_path, q8


def load(path: str, **kw):
    kw.setdefault("dtype", torch.float32)
    return qwen3vl.Qwen3VL.from_pretrained(path, weight_cache=False, **kw)


def reference(path: str, moe: bool = False):
    transformers = pytest.importorskip("transformers")
    cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def compare(ours, ref, inputs: dict) -> float:
    with torch.no_grad():
        expected = ref(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).logits
        got = ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    return rel_err(got[valid], expected[valid])


INPUTS = lambda: batch(Builder(21).text(5).image(8, 12).text(7), Builder(22).text(4).video(3, 6, 8).text(5))  # noqa: E731
PROMPT = lambda: batch(Builder(31).text(5).image(8, 12).text(6))  # noqa: E731


def our_weight(model, name: str, cfg: dict) -> torch.Tensor:
    """Our tensor (slice) that checkpoint tensor ``name`` was loaded into."""
    from qwen3vl.weights import _Destinations, name_table

    tgt = name_table(model.config, per_expert=".mlp.experts." in name)[name]
    return _Destinations(model)._slice(tgt)


def assert_exact_dequantized(model, q8: dict, cfg: dict) -> int:
    """Every FP8 weight we hold equals fp8.float() * scale exactly; -> how many were checked."""
    n = 0
    for name, q in q8.items():
        if name + "_scale_inv" in q8:
            assert torch.equal(our_weight(model, name, cfg), dequantize_blocks(q, q8[name + "_scale_inv"])), name
            n += 1
    return n


# ------------------------------------------------------------------ dense, tile-aligned
@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("fp8"), "aligned", ALIGNED, torch.bfloat16, seed=3, split_scales=True)


def test_aligned_matches_the_reference_fp8_loader(aligned):
    """Oracle: transformers' own FP8 loader (it dequantizes on CPU into the requested dtype, in
    fp32 arithmetic). Sharded: every weight in one file, its scale in the other."""
    pytest.importorskip("accelerate")  # transformers' FP8 quantizer requires it
    fp8_path, _, q8 = aligned
    ours, ref = load(fp8_path), reference(fp8_path)
    assert assert_exact_dequantized(ours, q8, ALIGNED) == 4 * 7  # q/k/v/o + gate/up/down per layer
    name = "model.language_model.layers.2.mlp.down_proj.weight"
    assert torch.equal(ref.model.language_model.layers[2].mlp.down_proj.weight,
                       dequantize_blocks(q8[name], q8[name + "_scale_inv"]))
    assert compare(ours, ref, INPUTS()) <= TOL
    assert_greedy_matches_reference(ours, ref, PROMPT())


# ------------------------------------------------------------------ dense, partial edge tiles
@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16-scales", "fp32-scales"])
def edge(request, tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("fp8"), "edge", EDGE, request.param, seed=4, split_scales=True)


def test_edge_tiles_load_exactly_and_match_the_reference(edge):
    """Oracle: the reference running the dequantized checkpoint (its FP8 loader mishandles a
    partial tile after a full one, see below)."""
    fp8_path, deq_path, q8 = edge
    ours, ref = load(fp8_path), reference(deq_path)
    assert assert_exact_dequantized(ours, q8, EDGE) == 4 * 7
    assert compare(ours, ref, INPUTS()) <= TOL
    assert_greedy_matches_reference(ours, ref, PROMPT())


def test_reference_fp8_loader_mishandles_a_partial_tile_after_a_full_one(edge):
    """Why the edge and MoE cases use the dequantized checkpoint: the pinned reference derives the
    block from shape // scale grid, so it refuses (320 rows / 3 scale rows) or silently uses the
    wrong block (192 / 2 = 96 rows instead of a 128-row tile and a 64-row one)."""
    pytest.importorskip("accelerate")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    fp8_path, _, q8 = edge
    with pytest.raises(RuntimeError):
        reference(fp8_path)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"  # (192, 192): 2 x 2 scales
    q, s = q8[name], q8[name + "_scale_inv"]
    assert not torch.equal(Fp8Dequantize(None)._dequantize_one(q, s, torch.float32), dequantize_blocks(q, s))


def test_bf16_runtime_rounds_the_fp32_product_once(edge):
    """dtype bf16: each weight is (fp8.float() * scale) rounded once to bf16, not fp8 -> bf16 * scale."""
    fp8_path, _, q8 = edge
    ours = load(fp8_path, dtype=torch.bfloat16)
    name = "model.language_model.layers.1.self_attn.k_proj.weight"
    expect = dequantize_blocks(q8[name], q8[name + "_scale_inv"]).bfloat16()
    assert torch.equal(our_weight(ours, name, EDGE), expect)


# ------------------------------------------------------------------ MoE, one tensor per expert
@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("fp8"), "moe", MOE, torch.float32, seed=5, split_scales=True)


def test_moe_per_expert_tensors_load_exactly_and_match_the_reference(moe):
    """Oracle: the reference (qwen3_vl_moe) running the dequantized checkpoint in the released
    fused layout (its FP8 loader cannot dequantize per-expert tensors). Here the vision tower's
    Linears (with biases) are FP8 too: a Linear is FP8 exactly when its scale exists."""
    fp8_path, deq_path, q8 = moe
    assert any(".mlp.experts.3.down_proj.weight_scale_inv" in n for n in q8)
    ours, ref = load(fp8_path), reference(deq_path, moe=True)
    # 3 sparse layers x 4 experts x 3 projections + q/k/v/o per layer + the dense layer's MLP
    # + 4 vision blocks x (qkv, proj, fc1, fc2) + 4 mergers x 2
    assert assert_exact_dequantized(ours, q8, MOE) == 3 * 4 * 3 + 4 * 4 + 3 + 4 * 4 + 4 * 2
    assert compare(ours, ref, INPUTS()) <= TOL
    assert_greedy_matches_reference(ours, ref, PROMPT())


# ------------------------------------------------------------------ int8 / int4 from FP8
@pytest.fixture(scope="module")
def edge_bf16(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("fp8"), "edge16", EDGE, torch.bfloat16, seed=6)


def quantized_buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, _Quantized)
            for b, t in m.named_buffers(recurse=False)}


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32)])
@pytest.mark.parametrize("case", ["edge_bf16", "moe"])
def test_int8_int4_from_fp8_equal_those_from_the_dequantized_checkpoint(request, case, mode, group):
    """The same fp32 values arrive row tile by row tile from FP8 as whole tensors from the fp32
    dequantized checkpoint; quantization is per row (int8) or per row group (int4), so the
    packed weights are bit-identical."""
    fp8_path, deq_path, _ = request.getfixturevalue(case)
    a = quantized_buffers(load(fp8_path, dtype=torch.bfloat16, quantization=mode, group_size=group))
    b = quantized_buffers(load(deq_path, dtype=torch.bfloat16, quantization=mode, group_size=group))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_weight_cache_path_loads_fp8(edge, tmp_path_factory, monkeypatch):
    """The default CPU load (converted weights cached on disk, then mapped) holds the same weights."""
    fp8_path, _, q8 = edge
    monkeypatch.setenv("QWEN3VL_HOME", fresh_home(tmp_path_factory))
    for _ in range(2):  # builds the cache, then maps it
        model = qwen3vl.Qwen3VL.from_pretrained(fp8_path, dtype=torch.float32, weight_cache=True)
        assert assert_exact_dequantized(model, q8, EDGE) == 4 * 7
