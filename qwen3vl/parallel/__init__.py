"""Tensor and expert parallelism on ``torch.distributed`` (gloo on CPU; NCCL on CUDA unverified).

``shard`` / ``moe``: how each module of the text decoder is split; ``load``: one rank's shard
from the checkpoint; ``runner``: the engine's Runner across ranks (rank 0 broadcasts each call);
``launch``: starting, checking and stopping the ranks (spawned here, or under ``torchrun``).
Used by ``qwen3vl.LLM(path, tensor_parallel_size=N, enable_expert_parallel=...)`` and
``qwen3vl serve --tensor-parallel-size N``.
"""
from .launch import RankArgs, TensorParallel, threads_per_rank, timeout_s, under_torchrun
from .runner import RankFailure
from .shard import ShardPlan

__all__ = ["RankArgs", "RankFailure", "ShardPlan", "TensorParallel", "threads_per_rank", "timeout_s",
           "under_torchrun"]
