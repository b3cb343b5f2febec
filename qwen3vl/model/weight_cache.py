"""Fast start-up: weights memory-mapped where they lie, conversions cached once on disk.

A CPU load maps the checkpoint's safetensors files (copy-on-write, ``MAP_PRIVATE``): every tensor
whose runtime dtype, shape and layout equal the file's (norms, embeddings, o_proj, down_proj,
the vision tower in bf16) is used in place, so the kernel maps its page-cache pages instead of
copying them. When that holds for every tensor once the fused q/k/v and gate/up projections are
split back into the checkpoint's parts (``split_linear``: a bf16 release loaded in bf16, an fp32
one in fp32), the model is used entirely where it lies: no cache file. Otherwise everything not
in place — the fused matrices, int8/int4 packs, dtype conversions, transposed MoE experts — is
written once to a cache file of converted weights in the runtime layout and mapped on later
starts, which then do no conversion at all.

Cache file ``$QWEN3VL_HOME/weights/<checkpoint>-<format>-<key>.qwc``:
``magic (16) | header length (8) | sha256 of the header (32) | header JSON | data``, data
64-byte aligned. The header names every cached tensor (dtype, shape, offset) and every tensor
taken from the checkpoint, and holds int64 wrap-around sums of the data in 64 MiB chunks,
checked on every start (~0.1 s/GB): a truncated or corrupt file is rebuilt, never used.

The key (``weight_cache_key``) hashes the format, the layout code, ``config.json`` and a sample of
each checkpoint file. While mapped, the checkpoint must not be modified in place (as for any
mmap-based loader).

Written atomically (temp file, blocks reserved up front, rename); an OS error (read-only or
full home) prints a warning and the load goes on without the cache. ``QWEN3VL_NO_WEIGHT_CACHE=1``
or ``weight_cache=False`` turns this off (weights copied into anonymous huge-page memory, see
``qwen3vl.allocator``); ``python -m qwen3vl.model.weight_cache_cli [--clear]`` lists (deletes) it.
"""
from __future__ import annotations

import gc
import glob
import hashlib
import json
import mmap
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import env
from ..weights import _scan, checkpoint_files, load_checkpoint, name_table, validate
from .promote import Promoter, address
from .split_linear import split, split_sources
from .weight_cache_key import MAGIC, format_name, cache_dir, cache_key, cache_path

ALIGN = 64
CHUNK = 64 * 2**20  # bytes per checksum
_PREFIX = 16 + 8 + 32


class CacheInvalid(RuntimeError):
    """A cache file that cannot be used (truncated, corrupt, another key or layout)."""


def enabled(flag: bool | None, device) -> bool:
    """Whether a load uses mapped weights and the cache: CPU only, on unless turned off."""
    if torch.device(device).type != "cpu":
        return False
    return (not env.no_weight_cache()) if flag is None else bool(flag)


# ---------------------------------------------------------------------- the model's slots
@dataclass
class _Slot:
    module: nn.Module
    attr: str
    tensor: torch.Tensor  # the meta placeholder
    is_param: bool


def _slots(model: nn.Module) -> dict[str, _Slot]:
    """Every parameter and buffer once (tied weights: the first name), by name."""
    out, seen = {}, set()
    for mname, module in model.named_modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, t in store.items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out[f"{mname}.{attr}" if mname else attr] = _Slot(module, attr, t, is_param)
    return out


def _in_place(slots: dict[str, _Slot], cfg, found: dict) -> dict[str, object]:
    """Parameters usable straight from the checkpoint: same name, dtype, shape, no slicing."""
    table = name_table(cfg)
    out = {}
    for name, slot in slots.items():
        tgt, entry = table.get(name), found.get(name)
        if (slot.is_param and tgt is not None and entry is not None and tgt.param == name and tgt.rows is None
                and not tgt.expert_layout and entry.dtype == slot.tensor.dtype
                and entry.shape == tuple(slot.tensor.shape) and entry.offset % entry.dtype.itemsize == 0):
            out[name] = entry
    return out


def _bind(slot: _Slot, t: torch.Tensor) -> None:
    if slot.is_param:
        setattr(slot.module, slot.attr, nn.Parameter(t, requires_grad=slot.tensor.requires_grad))
    else:
        slot.module._buffers[slot.attr] = t


def _view(buf, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def _map(fn: str, access=mmap.ACCESS_COPY) -> mmap.mmap:
    with open(fn, "r+b" if access == mmap.ACCESS_WRITE else "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=access)
    if env.huge_pages() and hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # pages not yet cached are read in 2 MiB folios where the kernel can (decode: fewer TLB misses)
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def _bind_in_place(slots, in_place: dict) -> list[mmap.mmap]:
    maps: dict[str, mmap.mmap] = {}
    for name, entry in in_place.items():
        if entry.file not in maps:
            maps[entry.file] = _map(entry.file)  # copy-on-write: a write never reaches the file
        _bind(slots[name], _view(maps[entry.file], entry.offset, entry.dtype, entry.shape))
    return list(maps.values())


def _attach_promoter(model: nn.Module, maps: list[mmap.mmap]) -> nn.Module:
    """``model.mapped``: moves the mapped weights into huge-page memory while the serving engine
    idles (None with ``QWEN3VL_HUGE_PAGES=0``: they then stay mapped)."""
    tensors = [getattr(slot.module, slot.attr) for slot in _slots(model).values()]
    model.mapped = Promoter(tensors, [(address(b), address(b) + len(b)) for b in maps]) if env.huge_pages() else None
    return model


def _checksums(buf, start: int, end: int) -> list[int]:
    """int64 wrap-around sums of [start, end) (8-byte multiples) in CHUNK pieces."""
    data = torch.frombuffer(buf, dtype=torch.uint8, count=end - start, offset=start) if end > start else None
    sums = []
    for a in range(0, end - start, CHUNK):
        sums.append(int(data[a : a + CHUNK].view(torch.int64).sum()))
    return sums


# ---------------------------------------------------------------------- reading
def _read_header(fn: str) -> dict:
    size = os.path.getsize(fn)
    with open(fn, "rb") as f:
        prefix = f.read(_PREFIX)
        if len(prefix) < _PREFIX or prefix[:16] != MAGIC:
            raise CacheInvalid("not a weight cache file of this version")
        n = int.from_bytes(prefix[16:24], "little")
        if n > size - _PREFIX:
            raise CacheInvalid(f"header length {n} past the end of the file ({size} bytes): truncated")
        raw = f.read(n)
    if hashlib.sha256(raw).digest() != prefix[24:56]:
        raise CacheInvalid("header checksum mismatch: corrupt")
    header = json.loads(raw)
    if header["total"] != size:
        raise CacheInvalid(f"{size} bytes, expected {header['total']}: truncated")
    return header


def open_cache(fn: str, key: str, model: nn.Module, found: dict) -> list[mmap.mmap]:
    """Bind ``model``'s (meta) tensors to the cache file ``fn`` and the checkpoint -> the file
    mappings; raises CacheInvalid (model left unusable) when the file does not check out."""
    header = _read_header(fn)
    if header["key"] != key:
        raise CacheInvalid("written for another checkpoint or format")
    slots = _slots(model)
    in_place = _in_place(slots, model.config, found)
    cached = header["tensors"]
    if set(cached) | set(header["in_place"]) != set(slots) or set(header["in_place"]) != set(in_place):
        raise CacheInvalid("tensor list does not match the model")
    buf = _map(fn)
    if _checksums(buf, header["data"], header["total"]) != header["sums"]:
        raise CacheInvalid("data checksum mismatch: corrupt")
    for name, (dtype, shape, offset) in cached.items():
        slot = slots[name]
        if dtype != str(slot.tensor.dtype) or tuple(shape) != tuple(slot.tensor.shape):
            raise CacheInvalid(f"{name}: {dtype} {shape} does not match the model")
        _bind(slot, _view(buf, offset, slot.tensor.dtype, shape))
    maps = [buf] + _bind_in_place(slots, in_place)
    model.tie_weights()
    return maps


def _map_whole(model: nn.Module, found: dict) -> list[mmap.mmap] | None:
    """Bind every tensor of ``model`` (meta) in place, the fused projections split into their
    checkpoint parts, when that covers the whole model -> the file mappings; None (model
    untouched) when it does not."""
    slots = _slots(model)
    in_place = _in_place(slots, model.config, found)
    rest = [name for name in slots if name not in in_place]
    sources = split_sources(model, found, rest)
    if sources is None or any(not slots[name].is_param for name in rest):
        return None
    validate(model, found)  # no load_checkpoint to check the names: unexpected tensors fail here
    in_place.update(split(model, sources))
    maps = _bind_in_place(_slots(model), in_place)
    model.tie_weights()
    return maps


# ---------------------------------------------------------------------- writing
def _plan(slots: dict[str, _Slot], in_place: dict, key: str, source: str) -> dict:
    """The header of a new cache file: where each converted tensor goes (64-byte aligned)."""
    rel, tensors = 0, {}
    for name, slot in slots.items():
        if name not in in_place:
            tensors[name] = [str(slot.tensor.dtype), list(slot.tensor.shape), rel]
            rel += -(-slot.tensor.numel() * slot.tensor.element_size() // ALIGN) * ALIGN
    header = {"key": key, "source": os.path.realpath(source), "in_place": sorted(in_place), "tensors": tensors,
              "sums": [-(2**63)] * -(-rel // CHUNK), "data": 0, "total": 0}
    room = len(json.dumps(header)) + 4096  # the final offsets and sums have at most this many more digits
    data = -(-(_PREFIX + room) // 4096) * 4096
    for v in tensors.values():
        v[2] += data
    header.update(data=data, total=data + rel)
    return header


def _create(tmp: str, size: int) -> None:
    """A new file of ``size`` bytes, its blocks reserved: a full disk fails here, up front."""
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _convert(header: dict, model: nn.Module, path: str, in_place: dict, progress, after_load) -> None:
    """Load the checkpoint into the model: tensors kept as they are mapped, the others converted
    into anonymous memory (writing them straight into a shared mapping of the new file was ~10x
    slower: a page-cache write fault per 4 KiB page)."""
    slots = _slots(model)
    for name, (_, shape, _) in header["tensors"].items():
        _bind(slots[name], torch.empty(shape, dtype=slots[name].tensor.dtype))
    _bind_in_place(slots, in_place)
    model.tie_weights()
    load_checkpoint(model, path, progress=progress, skip=frozenset(in_place))
    after_load(model)


def _write(tmp: str, header: dict, model: nn.Module) -> None:
    """The converted tensors, then their checksums and the header, with plain sequential writes."""
    slots = _slots(model)
    with open(tmp, "r+b") as f:
        for name, (_, _, offset) in header["tensors"].items():
            t = getattr(slots[name].module, slots[name].attr)
            if t.numel():
                f.seek(offset)
                f.write(memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        header["sums"] = _file_checksums(f, header["data"], header["total"])
        raw = json.dumps(header).encode()
        if _PREFIX + len(raw) > header["data"]:
            raise RuntimeError("weight cache header outgrew its reserved room")  # a bug, not bad input
        f.seek(0)
        f.write(MAGIC + len(raw).to_bytes(8, "little") + hashlib.sha256(raw).digest() + raw)


def _file_checksums(f, start: int, end: int) -> list[int]:
    """``_checksums`` of an open file, read back through one buffer: mapping the file here would
    add its size to the peak RSS while the converted copy is still in memory."""
    buf = torch.empty(min(CHUNK, max(end - start, 0)), dtype=torch.uint8)
    view, sums = memoryview(buf.numpy()), []
    for a in range(start, end, CHUNK):
        n = min(CHUNK, end - a)
        f.seek(a)
        done = 0
        while done < n:
            got = f.readinto(view[done:n])
            if not got:
                raise OSError(f"{f.name}: short read at byte {a + done}")
            done += got
        sums.append(int(buf[:n].view(torch.int64).sum()))
    return sums


def _warn(msg: str) -> None:
    print(f"qwen3vl: weight cache: {msg}", file=sys.stderr, flush=True)


def build_cache(fn: str, key: str, model: nn.Module, path: str, found: dict, progress, after_load) -> bool:
    """Write the cache file ``fn`` (atomically) by loading the checkpoint into ``model`` (meta).
    False, with a warning, when the cache folder cannot take it; load errors propagate."""
    in_place = _in_place(_slots(model), model.config, found)
    header = _plan(_slots(model), in_place, key, path)
    tmp = f"{fn}.tmp{os.getpid()}"
    try:
        _create(tmp, header["total"])
    except OSError as e:
        _warn(f"cannot write {tmp} ({e}); loading without it")
        return False
    try:
        _convert(header, model, path, in_place, progress, after_load)
        _write(tmp, header, model)
        os.replace(tmp, fn)
        return True
    except OSError as e:
        _warn(f"cannot write {fn} ({e}); loading without it")
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prune(keep: str) -> None:
    """Remove older caches of the same checkpoint and format, caches of checkpoints that no longer
    exist, and temp files of dead writers."""
    stem = os.path.basename(keep).rsplit("-", 1)[0]  # <checkpoint>-<where>-<format>: equal, not a prefix
    for fn in glob.glob(os.path.join(cache_dir(), "*.qwc")):
        if fn == keep:
            continue
        try:
            gone = not os.path.isdir(_read_header(fn).get("source", ""))
        except (OSError, CacheInvalid, ValueError, KeyError):
            gone = True
        if gone or os.path.basename(fn).rsplit("-", 1)[0] == stem:
            _remove(fn)
    for fn in glob.glob(os.path.join(cache_dir(), "*.qwc.tmp*")):
        try:
            os.kill(int(fn.rsplit(".tmp", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            _remove(fn)
        except PermissionError:
            pass


def _remove(fn: str) -> int:
    try:
        size = os.path.getsize(fn)
        os.unlink(fn)
    except OSError:
        return 0
    return size


# ---------------------------------------------------------------------- entry point
def load(make_model, path: str, dtype: torch.dtype, quantization: str | None, group_size: int,
         progress=None, after_load=lambda m: None) -> nn.Module | None:
    """A model for checkpoint folder ``path`` with mapped weights: from the cache when it holds a
    valid file for this checkpoint and format, else built (once, stating its cost) and then
    mapped. ``make_model()``: a fresh meta model in the runtime layout (quantized modules in
    place); ``after_load(model)``: what the caller does between loading and finalizing (e.g. the
    tied quantized lm_head). None when no cache file could be written (load without it)."""
    files = checkpoint_files(path)
    found = _scan(files)
    if not quantization:
        model = make_model()
        maps = _map_whole(model, found)
        if maps is not None:
            _prune(cache_path(path, format_name(dtype, None, group_size), ""))  # e.g. an older version's fused file
            return _attach_promoter(model, maps)
    key = cache_key(path, files, format_name(dtype, quantization, group_size))
    fn = cache_path(path, format_name(dtype, quantization, group_size), key)
    if os.path.exists(fn):
        model = make_model()
        try:
            return _attach_promoter(model, open_cache(fn, key, model, found))
        except (CacheInvalid, OSError, ValueError, KeyError, TypeError) as e:
            _warn(f"{fn} unusable ({e}); rebuilding it")
    t0 = time.perf_counter()
    if not build_cache(fn, key, make_model(), path, found, progress, after_load):
        return None
    gc.collect()
    model = make_model()
    maps = open_cache(fn, key, model, found)
    size = os.path.getsize(fn)
    _warn(f"converted {os.path.basename(os.path.normpath(path))} to {format_name(dtype, quantization, group_size)} "
          f"in {time.perf_counter() - t0:.1f} s (one time: {size / 2**30:.2f} GiB in {cache_dir()}; "
          "later starts map it)")
    _prune(fn)
    return _attach_promoter(model, maps)
