"""Checkpoint loading: safetensors (single file or sharded), one explicit name table, streaming.

The name table maps every tensor name of the RELEASED checkpoint layout onto a parameter of our
model, with an optional row slice (q/k/v and gate/up are fused here) and an optional transpose
(MoE experts). The transformers >= 5 re-serialisation, which stores experts transposed, is
accepted too: the expert shapes tell which layout a file has.
MoE experts stored one tensor per expert (the FP8 releases) are accepted as well, and FP8 weights
(a ``weight_scale_inv`` beside them) are dequantized tile by tile as they stream in (``qwen3vl.fp8``).

Loading streams one tensor at a time, with plain reads (our own header parser; no memory map),
into a model built on the meta device and materialised with ``to_empty``, so peak memory stays
about one copy of the weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from . import env, fp8
from .config import Qwen3VLConfig


class WeightsError(RuntimeError):
    """A checkpoint whose tensors do not match the model."""


@dataclass(frozen=True)
class Target:
    param: str                      # our parameter name
    rows: tuple[int, int] | None = None  # slice of dim 0 of the parameter (fused tensors)
    expert_layout: bool = False     # released (E, in, out) experts, stored (E, out, in) here
    expert: int | None = None       # one expert's matrix of an (E, N, K) stack (FP8 releases)


def name_table(cfg: Qwen3VLConfig, per_expert: bool = False) -> dict[str, Target]:
    """Checkpoint tensor name -> where it goes in our model. ``per_expert``: MoE experts stored one
    (N, K) tensor per expert and projection (``mlp.experts.{e}.gate_proj.weight``, as the FP8
    releases do) instead of the bf16 releases' fused stacks."""
    table: dict[str, Target] = {}
    v, t = cfg.vision, cfg.text

    def same(*names: str) -> None:
        for n in names:
            table[n] = Target(n)

    pv = "model.visual."
    same(pv + "patch_embed.proj.weight", pv + "patch_embed.proj.bias", pv + "pos_embed.weight")
    for i in range(v.depth):
        b = f"{pv}blocks.{i}."
        for mod in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            same(b + mod + ".weight", b + mod + ".bias")
    mergers = ["merger."] + [f"deepstack_merger_list.{k}." for k in range(len(v.deepstack_visual_indexes))]
    for m in mergers:
        for mod in ("norm", "linear_fc1", "linear_fc2"):
            same(pv + m + mod + ".weight", pv + m + mod + ".bias")

    pt = "model.language_model."
    same(pt + "embed_tokens.weight", pt + "norm.weight")
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    for i in range(t.num_hidden_layers):
        b = f"{pt}layers.{i}."
        same(b + "input_layernorm.weight", b + "post_attention_layernorm.weight",
             b + "self_attn.q_norm.weight", b + "self_attn.k_norm.weight", b + "self_attn.o_proj.weight")
        suffixes = (".weight", ".bias") if t.attention_bias else (".weight",)
        for s in suffixes:
            for name, rows in (("q_proj", (0, q)), ("k_proj", (q, q + kv)), ("v_proj", (q + kv, q + 2 * kv))):
                table[f"{b}self_attn.{name}{s}"] = Target(f"{b}self_attn.qkv_proj{s}", rows)
        if t.attention_bias:
            same(b + "self_attn.o_proj.bias")
        if t.is_sparse_layer(i):
            same(b + "mlp.gate.weight")
            if per_expert:
                table.update(_expert_names(b, t.num_experts, t.moe_intermediate_size))
                continue
            table[b + "mlp.experts.gate_up_proj"] = Target(b + "mlp.gate_up_proj", expert_layout=True)
            table[b + "mlp.experts.down_proj"] = Target(b + "mlp.down_proj", expert_layout=True)
        else:
            im = t.intermediate_size
            table[b + "mlp.gate_proj.weight"] = Target(b + "mlp.gate_up_proj.weight", (0, im))
            table[b + "mlp.up_proj.weight"] = Target(b + "mlp.gate_up_proj.weight", (im, 2 * im))
            same(b + "mlp.down_proj.weight")
    if not cfg.tie_word_embeddings:
        same("lm_head.weight")
    return table


def _expert_names(b: str, experts: int, inter: int) -> dict[str, Target]:
    """Per-expert tensors of layer prefix ``b`` -> rows of expert e's (2I, H) / (H, I) matrices."""
    out = {}
    for e in range(experts):
        p = f"{b}mlp.experts.{e}."
        out[p + "gate_proj.weight"] = Target(b + "mlp.gate_up_proj", (0, inter), expert=e)
        out[p + "up_proj.weight"] = Target(b + "mlp.gate_up_proj", (inter, 2 * inter), expert=e)
        out[p + "down_proj.weight"] = Target(b + "mlp.down_proj", expert=e)
    return out


def _target_shape(tgt: Target, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the checkpoint tensor must have (released layout)."""
    shape = tuple(param_shape) if tgt.expert is None else tuple(param_shape[1:])
    if tgt.rows is not None:
        shape = (tgt.rows[1] - tgt.rows[0],) + shape[1:]
    if tgt.expert_layout:
        shape = (shape[0], shape[2], shape[1])
    return shape


class _Destinations:
    """Resolves a parameter name of the name table to where its data goes: a plain parameter,
    or a module that loads (and e.g. quantizes) weights itself via ``load_weight(rows, tensor)``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def loader(self, param: str):
        """The module that loads ``param`` itself: the owner of a ``.weight`` (QuantLinear) or a
        module standing where a parameter was (QuantExperts for MoE expert stacks)."""
        owner, _, attr = param.rpartition(".")
        for name in ((owner,) if attr == "weight" else ()) + (param,):
            try:
                module = self.model.get_submodule(name)
            except AttributeError:  # a parameter, not a module
                continue
            if hasattr(module, "load_weight"):
                return module
        return None

    def shape(self, param: str) -> tuple[int, ...]:
        loader = self.loader(param)
        return tuple(loader.logical_shape) if loader is not None else tuple(self.params[param].shape)

    def direct(self, tgt: Target, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The parameter (slice) itself when file bytes can be read straight into it."""
        if self.loader(tgt.param) is not None:
            return None
        dst = self._slice(tgt)
        if dst.device.type != "cpu" or dst.dtype != dtype or tuple(dst.shape) != shape or not dst.is_contiguous():
            return None
        return dst

    def _slice(self, tgt: Target) -> torch.Tensor:
        dst = self.params[tgt.param]
        if tgt.expert is not None:
            dst = dst[tgt.expert]
        if tgt.rows is not None:
            dst = dst[tgt.rows[0] : tgt.rows[1]]  # a leading-dim slice stays contiguous
        return dst

    def copy(self, tgt: Target, src: torch.Tensor) -> None:
        loader = self.loader(tgt.param)
        if loader is not None:
            loader.load_weight(tgt.rows, src, expert=tgt.expert)
            return
        self._slice(tgt).copy_(src)


def checkpoint_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Released-layout tensor name -> shape for a (possibly meta) model."""
    dest = _Destinations(model)
    return {n: _target_shape(tgt, dest.shape(tgt.param)) for n, tgt in name_table(model.config).items()}


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder (index-driven when sharded)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise WeightsError(f"{index} lists shard files that do not exist: {missing}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {path}")
    return files


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def _read_header(fn: str) -> dict[str, _Entry]:
    """Parse one safetensors header (8-byte little-endian length, JSON) and check that every
    tensor's bytes lie inside the file, so a truncated file fails here and not mid-load."""
    def bad(why: str) -> WeightsError:
        return WeightsError(f"cannot read {fn}: {why} (truncated or not a safetensors file?)")

    size = os.path.getsize(fn)
    with open(fn, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("file shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, 256 * 2**20):
            raise bad(f"header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed header entry for {name!r} ({e!r})") from e
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        if 8 + n + end > size:
            raise bad(f"tensor {name!r} ends at byte {8 + n + end}, past the end of the file ({size} bytes)")
        entries[name] = _Entry(fn, dtype, shape, 8 + n + begin, end - begin)
    return entries


def _scan(files: list[str]) -> dict[str, _Entry]:
    """Tensor name -> where it is, from the headers only."""
    found: dict[str, _Entry] = {}
    for fn in files:
        found.update(_read_header(fn))
    return found


class _Scratch:
    """One reusable read buffer for tensors that are converted, sliced or quantized on the way
    in (no fresh allocation, and no page faults, per tensor)."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, entry: _Entry) -> torch.Tensor:
        if self.buf.numel() < entry.nbytes:
            self.buf = torch.zeros(entry.nbytes, dtype=torch.uint8)
        return self.buf[: entry.nbytes].view(entry.dtype).view(entry.shape)


def _read_into(f, entry: _Entry, out: torch.Tensor) -> None:
    """Read one tensor's bytes into ``out`` (CPU, contiguous, entry's dtype and size)."""
    f.seek(entry.offset)
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    done = 0
    while done < entry.nbytes:  # readinto may return short counts on some file systems
        got = f.readinto(view[done:])
        if not got:
            raise WeightsError(f"cannot read {entry.file}: unexpected end of file (truncated?)")
        done += got


def _expert_needs_transpose(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool | None:
    """True: released layout; False: transformers >= 5 layout; None: neither."""
    if shape == expected:
        return True
    if shape == (expected[0], expected[2], expected[1]):
        return False
    return None


def _validate(cfg: Qwen3VLConfig, model, found, table: dict[str, Target]) -> dict[str, bool]:
    """Check names and shapes; returns, for expert tensors, whether to transpose them."""
    dest = _Destinations(model)
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(table) - set(found))
    unexpected = sorted(set(found) - set(table) - ignorable)
    wrong, transpose = [], {}
    for name, entry in found.items():
        shape = entry.shape
        tgt = table.get(name)
        if tgt is None:
            continue
        expected = _target_shape(tgt, dest.shape(tgt.param))
        if tgt.expert_layout:
            flag = _expert_needs_transpose(shape, expected)
            if flag is None:
                wrong.append(f"{name}: {list(shape)} (expected {list(expected)})")
            transpose[name] = bool(flag)
        elif shape != expected:
            wrong.append(f"{name}: {list(shape)} (expected {list(expected)})")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"  {len(items)} {title} tensor(s):\n    {shown}")
    if problems:
        raise WeightsError("checkpoint does not match the model config:\n" + "\n".join(problems))
    return transpose


def validate(model, found: dict[str, _Entry]) -> None:
    """Raise WeightsError listing the missing, unexpected and wrong-shape tensors of checkpoint
    entries ``found`` (no FP8 scales) for ``model`` (any device, meta included)."""
    table = name_table(model.config, per_expert=any(".mlp.experts.0." in n for n in found))
    _validate(model.config, model, found, table)


def _read_whole(entry: _Entry) -> torch.Tensor:
    """One (small) tensor into a fresh buffer."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    with open(entry.file, "rb", buffering=0) as f:
        _read_into(f, entry, out)
    return out


def _copy_fp8(dest: _Destinations, tgt: Target, q: torch.Tensor, scale: torch.Tensor,
              block: tuple[int, int]) -> None:
    """FP8 ``q`` (N, K) into ``tgt``, one dequantized fp32 row tile at a time (``qwen3vl.fp8``),
    or kept FP8 by a module that takes it as stored (``load_fp8``: CUDA FP8 matmuls)."""
    loader = dest.loader(tgt.param)
    if hasattr(loader, "load_fp8"):
        loader.load_fp8(tgt.rows, q, scale)
        return
    base = tgt.rows[0] if tgt.rows is not None else 0
    for r0, r1, rows in fp8.row_tiles(q, scale, block):  # rows (<=128, K) fp32
        dest.copy(dataclasses.replace(tgt, rows=(base + r0, base + r1)), rows)


def load_checkpoint(model: torch.nn.Module, path: str, progress: bool | None = None,
                    skip: frozenset[str] = frozenset()) -> None:
    """Stream a checkpoint folder's tensors into ``model`` (already materialised, any device).

    Tensors are read with plain file reads, in file order, straight into the parameter when it
    is a CPU tensor of the same dtype, else through a one-tensor buffer: no memory map, so the
    process never holds file pages on top of the weights. ``skip``: checkpoint names already in
    place (memory-mapped by ``qwen3vl.model.weight_cache``), validated but not read."""
    cfg = model.config
    files = checkpoint_files(path)
    everything = _scan(files)
    fp8_scales = fp8.pair_scales(everything, cfg.quantization)  # FP8 weight -> its scale
    found = {n: e for n, e in everything.items() if not n.endswith(fp8.SCALE_SUFFIX)}
    table = name_table(cfg, per_expert=any(".mlp.experts.0." in n for n in found))
    transpose = _validate(cfg, model, found, table)
    dest = _Destinations(model)
    # Scales first (tiny): a weight may come before its scale, even from another shard.
    scales = {w: _read_whole(everything[s]) for w, s in fp8_scales.items() if w not in skip}
    block = (cfg.quantization.weight_block_size if cfg.quantization else (128, 128))
    total = sum(e.nbytes for name, e in found.items() if name in table)
    if progress is None:
        progress = total > 256 * 2**20 and not env.progress_disabled()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")
    scratch = _Scratch()
    with torch.no_grad():
        for fn in files:
            entries = sorted((e.offset, name) for name, e in found.items()
                             if e.file == fn and name in table and name not in skip)
            with open(fn, "rb", buffering=0) as f:
                for _, name in entries:
                    entry, tgt = found[name], table[name]
                    direct = None if transpose.get(name) else dest.direct(tgt, entry.dtype, entry.shape)
                    if name in scales:  # FP8: dequantized tile by tile into the destination
                        src = scratch.get(entry)
                        _read_into(f, entry, src)
                        _copy_fp8(dest, tgt, src, scales[name], block)
                    elif direct is not None:
                        # Fresh pages first touched inside read() fault ~4x slower than when
                        # touched from user space, so touch them first.
                        _read_into(f, entry, direct.zero_())
                    else:
                        src = scratch.get(entry)
                        _read_into(f, entry, src)
                        dest.copy(tgt, src.transpose(1, 2) if transpose.get(name) else src)
                    if bar is not None:
                        bar.update(entry.nbytes)
    if bar is not None:
        bar.close()
