"""Starting, checking and stopping the ranks of a tensor-parallel group.

``TensorParallel(world, args)`` is created by rank 0 (``qwen3vl.LLM`` / ``qwen3vl serve`` with
``tensor_parallel_size`` > 1). Standalone it spawns ranks 1..N-1 on this host
(fresh interpreters, rendezvous on a free localhost port); launched under ``torchrun``
(``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set, e.g. ``--nnodes M`` across hosts) it joins the
group torchrun describes, and on ranks > 0 the same command becomes a worker that exits when
rank 0 stops (``SystemExit(0)``). Every rank loads only its shard; a load error on any rank
is reported by rank 0 with that rank's message.

Failure handling: a spawned rank that dies is noticed at once (its process sentinel): rank 0
prints which rank died and how, stops the others, and every later (or blocked) call raises
``RankFailure`` with that message; ``on_failure`` lets the server stop itself. Ranks > 0 exit
when rank 0's process goes away (their parent, or a closed connection). Collectives time out
after ``QWEN3VL_TP_TIMEOUT`` seconds (default 600; waiting for the next command never does).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import env
from ..model.qwen3vl import Qwen3VLModel
from .comm import Channel
from .load import load_shard
from .runner import DistributedRunner, RankFailure, follow
from .shard import ShardPlan


@dataclass(frozen=True)
class RankArgs:
    """What every rank needs to load its shard (picklable: it travels to spawned ranks)."""

    path: str
    dtype: str = "auto"
    quantization: str | None = None
    group_size: int = 64
    rope_scaling: dict | str | None = None
    expert_parallel: bool = False
    threads: int = 1
    timeout_s: float = 600.0


def threads_per_rank(world: int) -> int:
    """Compute threads per rank: ``QWEN3VL_TP_THREADS``, else this host's cores / its ranks
    (torchrun's ``LOCAL_WORLD_SIZE`` when launched by it, else N)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world) if under_torchrun() else world
    return env.tp_threads() or max(1, (os.cpu_count() or 1) // local)


def timeout_s() -> float:
    """Seconds a collective may wait (``QWEN3VL_TP_TIMEOUT``, default 600)."""
    return env.tp_timeout()


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _init(rank: int, world: int, init_method: str, timeout_s: float) -> Channel:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return Channel(dist.new_group(backend="gloo", timeout=timedelta(days=365)))


def _load_checked(rank: int, world: int, args: RankArgs, cls):
    """Load this rank's shard, then agree with every rank that all loaded (else raise with the
    failing ranks' messages on every rank)."""
    torch.set_num_threads(args.threads)
    model, error = None, None
    try:
        model = load_shard(cls, args.path, ShardPlan(rank, world, args.expert_parallel), args.dtype,
                           args.quantization, args.group_size, args.rope_scaling)
    except Exception as e:  # reported by every rank below
        error = f"{type(e).__name__}: {e}"
    errors = [None] * world
    dist.all_gather_object(errors, error)
    bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if bad:
        raise RankFailure("tensor-parallel load failed on " + "; ".join(bad))
    return model


def _serve_rank(rank: int, world: int, args: RankArgs, channel: Channel) -> None:
    """Ranks > 0: load the shard, build the runner rank 0 describes, run its calls until stop."""
    model = _load_checked(rank, world, args, Qwen3VLModel)
    op, (slots, max_len), _ = channel.recv()
    if op == "stop":
        return
    follow(DistributedRunner(model, slots, max_len, ShardPlan(rank, world, args.expert_parallel)), channel)


def _watch_parent(parent: int) -> None:
    """Exit when rank 0's process is gone (a spawned rank must never outlive it)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qwen3vl-tp-parent").start()


def spawned_rank(rank: int, world: int, port: int, args: RankArgs, parent: int) -> None:
    _watch_parent(parent)
    try:
        channel = _init(rank, world, f"tcp://127.0.0.1:{port}", args.timeout_s)
        _serve_rank(rank, world, args, channel)
    except Exception as e:
        print(f"qwen3vl: tensor-parallel rank {rank} stopped: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(1)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallel:
    """Rank 0's handle on the group: ``model`` (rank 0's shard, of class ``cls``), ``runner()``
    for the engine, ``shutdown()`` (also at interpreter exit)."""

    def __init__(self, world: int, args: RankArgs, cls, on_failure=None):
        if world < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 here, got {world}")
        self.world, self.args, self.on_failure = world, args, on_failure
        self.procs: list = []
        self.failure: str | None = None
        self.closed, self.channel, self._runner = False, None, None
        if under_torchrun():
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if size != world:
                raise ValueError(f"tensor_parallel_size {world} but torchrun started {size} ranks (WORLD_SIZE)")
            self.channel = _init(rank, world, "env://", args.timeout_s)
            if rank != 0:  # this process is a worker: serve rank 0 until it stops, then exit
                _serve_rank(rank, world, args, self.channel)
                dist.destroy_process_group()
                raise SystemExit(0)
        else:
            self._spawn()
        atexit.register(self.shutdown)
        try:
            self.model = _load_checked(0, world, args, cls)
        except BaseException:
            self.shutdown()
            raise

    def _spawn(self) -> None:
        """Ranks 1..N-1 as fresh interpreters (``python -m qwen3vl.parallel.worker``): unlike
        multiprocessing's spawn, this never re-imports the caller's ``__main__``."""
        port = _free_port()
        spec = json.dumps({"world": self.world, "port": port, "parent": os.getpid(), "args": asdict(self.args)})
        for r in range(1, self.world):
            self.procs.append(subprocess.Popen([sys.executable, "-m", "qwen3vl.parallel.worker", str(r), spec]))
        threading.Thread(target=self._monitor, daemon=True, name="qwen3vl-tp-monitor").start()
        try:
            self.channel = _init(0, self.world, f"tcp://127.0.0.1:{port}", self.args.timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _monitor(self) -> None:
        """Poll the ranks' processes; an exit before shutdown takes the group down."""
        while not self.closed and self.failure is None:
            self._poll()
            time.sleep(0.2)

    def _poll(self) -> str | None:
        """The first spawned rank found exited (before shutdown): record it, stop the others."""
        for rank, p in enumerate(self.procs, 1):
            code = p.poll()
            if code is None or self.closed or self.failure is not None:
                continue
            self.failure = f"tensor-parallel rank {rank} (pid {p.pid}) died with exit code {code}; stopping all ranks"
            print(f"qwen3vl: {self.failure}", file=sys.stderr, flush=True)
            for q in self.procs:
                if q.poll() is None:
                    q.terminate()
            if self.on_failure is not None:
                self.on_failure(self.failure)
        return self.failure

    def diagnose(self, error: Exception) -> str | None:
        """After a failed call on rank 0: the failure message when a rank is gone (spawned ranks:
        waits up to 2 s for the dead process to be reaped), None for an ordinary error."""
        if "gloo" not in str(error).lower() and "connection" not in str(error).lower():
            return self.failure
        deadline = time.monotonic() + 2.0
        while self.procs and self.failure is None and time.monotonic() < deadline:
            if self._poll() is None:
                time.sleep(0.05)
        if self.failure is None:  # torchrun ranks (not our children), or a hang
            self.failure = f"a tensor-parallel collective failed ({error}); a rank died or hung"
        return self.failure

    def runner(self, slots: int, max_len: int) -> DistributedRunner:
        """The engine's runner on rank 0 (the other ranks build theirs from this call)."""
        self.check()
        self.channel.send("init", (slots, max_len))
        self._runner = DistributedRunner(self.model, slots, max_len, ShardPlan(0, self.world, self.args.expert_parallel),
                                         self.channel)
        self._runner.health = self
        return self._runner

    def check(self) -> None:
        if self.failure is not None:
            raise RankFailure(self.failure)
        if self.closed:
            raise RankFailure("the tensor-parallel group was shut down")

    def shutdown(self) -> None:
        """Stop every rank (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None and self.channel is not None:
            try:
                self.channel.send("stop")
            except Exception:  # a rank already gone: stopping the rest anyway
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(5)
        if dist.is_initialized():
            dist.destroy_process_group()

