"""The collectives tensor parallelism uses, on ``torch.distributed``'s default process group
(gloo on CPU, NCCL on CUDA: unverified), plus the command channel rank 0 drives the others with.

* ``all_reduce_`` sums the partial outputs of row-split projections (o_proj, down_proj, experts)
  in place. bf16/fp16 partials are summed in float32 and rounded once: closer to the single
  process, which rounds each full dot product once.
* ``gather_last`` collects the vocabulary slices of the logits on rank 0 (only rank 0 samples).
* ``Channel``: rank 0 broadcasts one command (a small picklable header) and its tensors; the other
  ranks receive the same call and run it on their shards. The header travels with
  ``broadcast_object_list``; tensors with plain ``broadcast`` (no pickling of activations).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

# Rank 0's seconds inside collectives and broadcasts (waiting for slower ranks included), for
# bench/bench_tp.py's communication time per step.
STATS = {"seconds": 0.0, "calls": 0}


def _timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    STATS["seconds"] += time.perf_counter() - t
    STATS["calls"] += 1
    return out


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (float32 accumulation for 16-bit types)."""
    if world() == 1:
        return t
    if t.dtype in (torch.bfloat16, torch.float16):
        acc = t.float()
        _timed(dist.all_reduce, acc)
        return t.copy_(acc)
    _timed(dist.all_reduce, t)
    return t


def gather_last(t: torch.Tensor, full: int) -> torch.Tensor:
    """Each rank's slice (..., n) of a last dimension split in rank order (every slice padded to
    the same n) -> on rank 0 the whole (..., full); other ranks get their own slice back."""
    n = world()
    if n == 1:
        return t
    t = t.contiguous()
    if dist.get_rank() != 0:
        dist.gather(t, None, dst=0)
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    _timed(dist.gather, t, parts, dst=0)
    return torch.cat(parts, -1)[..., :full]


class Channel:
    """Rank 0 -> all: ``send(op, args, tensors)``; others: ``recv() -> (op, args, tensors)``.
    ``None`` entries in ``tensors`` stay None; bool tensors travel as uint8."""

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        self.group = group  # its own process group: waiting for the next command never times out
        self.device = torch.device(device)
        self.sent_bytes = 0  # tensor bytes broadcast so far (benchmarks: communication per step)

    def send(self, op: str, args: tuple = (), tensors: list = ()) -> None:
        specs = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        _timed(dist.broadcast_object_list, [(op, args, specs)], src=0, group=self.group)
        for t in tensors:
            if t is not None:
                t = t.to(self.device).contiguous()
                _timed(dist.broadcast, t.view(torch.uint8) if t.dtype == torch.bool else t, src=0, group=self.group)
                self.sent_bytes += t.numel() * t.element_size()

    def recv(self) -> tuple[str, tuple, list]:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        op, args, specs = box[0]
        tensors = []
        for spec in specs:
            if spec is None:
                tensors.append(None)
                continue
            shape, dtype = spec
            t = torch.empty(shape, dtype=torch.uint8 if dtype == torch.bool else dtype, device=self.device)
            dist.broadcast(t, src=0, group=self.group)
            tensors.append(t.view(torch.bool) if dtype == torch.bool else t)
        return op, args, tensors
