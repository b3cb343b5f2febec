"""Continuous-batching scheduler: which request gets which KV slot, and when.

Requests wait in FIFO order; a free slot (lowest index first, so the decode batch 0..B-1 stays
dense) admits one waiting request per step (the engine asks for the next one only once the
previous one's chunked prefill is done). The requests of a prefill group (``Request.group``: one
padded batch) are admitted together, into consecutive slots.
"""
from __future__ import annotations

from collections import deque

from .request import Request


class Scheduler:
    def __init__(self, slots: int):
        self.slots: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def num_waiting(self) -> int:
        """Waiting requests that will still run (not aborted before they started)."""
        return sum(not r.aborted for r in self.waiting)

    def drop_aborted_waiting(self) -> list[Request]:
        """Remove and return waiting requests that were aborted before they started."""
        gone = [r for r in self.waiting if r.aborted and r.group is None]  # a group runs whole
        for r in gone:
            self.waiting.remove(r)
        return gone

    def admit(self) -> list[Request]:
        """Move the next waiting request (or its whole prefill group) into the lowest free slots,
        consecutive ones for a group -> the admitted requests ([] when they do not fit yet)."""
        if not self.waiting:
            return []
        head = self.waiting[0]
        members = head.group.requests if head.group is not None else [head]
        n = len(members)
        first = next((i for i in range(len(self.slots) - n + 1) if all(s is None for s in self.slots[i : i + n])),
                     None)
        if first is None:
            return []
        for k, req in enumerate(members):
            self.waiting.remove(req)
            req.slot = first + k
            self.slots[req.slot] = req
        return members

    def release(self, req: Request) -> None:
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        req.slot = None

    def remove_waiting(self, req: Request) -> None:
        try:
            self.waiting.remove(req)
        except ValueError:
            pass
