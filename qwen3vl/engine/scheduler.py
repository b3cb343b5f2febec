"""Continuous-batching scheduler: which request gets which KV slot, and when.

Requests wait in FIFO order; a free slot (lowest index first, so the decode batch 0..B-1 stays
dense) admits one waiting request per step, whose prefill runs between two decode steps, so a
new request never stalls the running ones for more than one prefill.
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

    def drop_aborted_waiting(self) -> list[Request]:
        """Remove and return waiting requests that were aborted before they started."""
        gone = [r for r in self.waiting if r.aborted]
        for r in gone:
            self.waiting.remove(r)
        return gone

    def admit(self) -> Request | None:
        """Move the next waiting request into the lowest free slot (or None)."""
        if not self.waiting or None not in self.slots:
            return None
        req = self.waiting.popleft()
        req.slot = self.slots.index(None)
        self.slots[req.slot] = req
        return req

    def release(self, req: Request) -> None:
        if req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        req.slot = None

    def remove_waiting(self, req: Request) -> None:
        try:
            self.waiting.remove(req)
        except ValueError:
            pass

    def decode_width(self) -> int:
        """Number of slots in the decode batch: up to the highest occupied slot."""
        occupied = [i for i, r in enumerate(self.slots) if r is not None]
        return occupied[-1] + 1 if occupied else 0
