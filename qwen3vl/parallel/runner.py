"""The engine's ``Runner`` across ranks: rank 0 (``DistributedRunner``) embeds the prompt (vision
encoder and token embedding live there only), broadcasts each call's inputs through the
``Channel`` and runs the call on its own shard; every other rank (``follow``) receives the same
call and runs it on its shard. The ranks meet inside the forward pass (all-reduces after o_proj,
down_proj and the MoE experts, the logits gather on rank 0), so only rank 0 gets logits.

Broadcast per call: prefill ``embeds`` (B, T, H) + positions (3, B, T) + visual mask and
DeepStack features; decode the (B, 1, H) embeddings of the new tokens, their positions and cache
rows; a slot reset (``KVCache.reset``) is a command too, so every rank's cache agrees.
"""
from __future__ import annotations

import sys

import torch

from ..engine.kv_cache import KVCache, Scatter, Window
from ..engine.runner import Runner
from ..model.text import AttnContext
from .comm import Channel
from .shard import ShardPlan, local_text_config


class RankFailure(RuntimeError):
    """A rank of the tensor-parallel group died or failed."""


class _SharedCache(KVCache):
    """Rank 0's KV cache: a slot reset is broadcast first, so all ranks forget the same rows."""

    channel: Channel
    guard = None  # the runner's ``_guard``

    def reset(self, slot: int, kept: int = 0) -> None:
        self.guard(self._reset, slot, kept)

    def _reset(self, slot: int, kept: int) -> None:
        self.channel.send("reset", (slot, kept))
        super().reset(slot, kept)


class DistributedRunner(Runner):
    """A ``Runner`` whose KV cache holds this rank's KV heads only. Rank 0 (``channel`` given)
    leads; ``follow`` drives the others."""

    def __init__(self, model, slots: int, max_len: int, plan: ShardPlan, channel: Channel | None = None):
        # Not Runner.__init__: its cache would hold every KV head (and CUDA graphs cannot
        # capture the collectives here: unverified, so off).
        self.model, self.slots, self.max_len, self.plan = model, slots, max_len, plan
        cfg = local_text_config(model.config.text, plan)
        cls = KVCache if channel is None else _SharedCache
        self.cache = cls(cfg, slots, max_len, model.dtype, model.device)
        self.cache.channel, self.cache.guard = channel, self._guard
        self.channel = channel
        self.prefilled_tokens = 0
        self.graphs = None
        self.health = None  # rank 0: the group (``launch.TensorParallel``), checked around every call

    def _guard(self, fn, *args):
        """Run a rank-0 call; a dead rank turns a blocked or failed collective into its message."""
        if self.health is not None:
            self.health.check()
        try:
            return fn(*args)
        except Exception as e:
            failure = None if self.health is None else self.health.diagnose(e)
            if failure is not None:
                raise RankFailure(failure) from e
            raise

    # ------------------------------------------------------------------ rank 0
    def prefill_rows(self, first_slot: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._guard(self._prefill_rows, first_slot, inputs)

    def prefill_tail(self, *args) -> torch.Tensor:
        return self._guard(self._prefill_tail, *args)

    def decode(self, *args) -> torch.Tensor:
        return self._guard(self._decode, *args)

    @torch.inference_mode()
    def _prefill_rows(self, first_slot: int, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = inputs["input_ids"].shape
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the maximum model length {self.max_len}")
        p = self.model.prepare(**inputs)  # vision + embedding on rank 0 only
        mask = inputs.get("attention_mask")
        valid = None if mask is None else mask.to(self.model.device, torch.bool)  # (B, T)
        self.channel.send("rows", (first_slot,), [valid, p.embeds, p.positions, p.visual_mask, *p.deepstack])
        logits = self.run_rows(first_slot, valid, p.embeds, p.positions, p.visual_mask, p.deepstack)
        self.prefilled_tokens += b * t
        return logits[:, -1].float(), p.next_position

    @torch.inference_mode()
    def _prefill_tail(self, slot: int, start: int, embeds: torch.Tensor, positions: torch.Tensor,
                     visual_mask: torch.Tensor | None, deepstack: list) -> torch.Tensor:
        self.cache.check_room(start + embeds.shape[1])  # before the broadcast: all ranks or none
        self.channel.send("tail", (slot, start), [embeds, positions, visual_mask, *deepstack])
        return super().prefill_tail(slot, start, embeds, positions, visual_mask, deepstack)

    @torch.inference_mode()
    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache_pos: torch.Tensor, end: int) -> torch.Tensor:
        embeds = self.model.model.language_model.embed_tokens(tokens[:, None].to(self.model.device))  # (B, 1, H)
        self.channel.send("decode", (end,), [embeds, positions, cache_pos])
        return self.run_decode(embeds, positions, cache_pos, end)

    def stop(self) -> None:
        self.channel.send("stop")

    # ------------------------------------------------------------------ every rank
    def run_rows(self, first_slot: int, valid, embeds, positions, visual_mask, deepstack) -> torch.Tensor:
        """``Runner.prefill_rows`` from embeddings: (B, T, H) into slots first_slot.. -> logits (B, 1, V)."""
        b, t = embeds.shape[:2]
        rows = slice(first_slot, first_slot + b)
        self.cache.valid[rows] = False  # forget the slots' previous requests
        view = Window(self.cache, rows, 0, valid, t)
        return self.model.step(embeds, positions.to(self.model.device), view, visual_mask, deepstack, 1)

    def run_decode(self, embeds, positions, cache_pos, end: int) -> torch.Tensor:
        """``model.decode_step`` from embeddings (B, 1, H) -> logits (B, V) float32 (rank 0)."""
        device = self.model.device
        view = Scatter(self.cache, cache_pos.to(device), end)
        cos, sin = self.model.rope.text(positions.to(device)[:, None], embeds.dtype)  # (B, 1, D)
        hidden = self.model.model.language_model(embeds, AttnContext(cos, sin, view))
        return self.model.logits(hidden)[:, -1].float()


@torch.inference_mode()
def follow(runner: DistributedRunner, channel: Channel) -> None:
    """Ranks > 0: run rank 0's calls on this shard until it sends ``stop``. A call that fails
    fails on rank 0 too, at the same point (same code, same inputs): report it and go on."""
    while True:
        op, args, ts = channel.recv()
        if op == "stop":
            return
        try:
            _run(runner, op, args, ts)
        except Exception as e:
            print(f"qwen3vl: tensor-parallel rank {runner.plan.rank}: {op} failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)


def _run(runner: DistributedRunner, op: str, args: tuple, ts: list) -> None:
    if op == "reset":
        runner.cache.reset(*args)
    elif op == "rows":
        runner.run_rows(args[0], ts[0], ts[1], ts[2], ts[3], ts[4:])
    elif op == "tail":
        Runner.prefill_tail(runner, args[0], args[1], ts[0], ts[1], ts[2], ts[3:])
    elif op == "decode":
        runner.run_decode(ts[0], ts[1], ts[2], args[0])
    else:
        raise RuntimeError(f"unknown tensor-parallel command {op!r}")
