"""Shared fixtures: tiny random checkpoints in the released layout, and the reference model."""
from __future__ import annotations

import contextlib
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from qwen3vl.random_checkpoint import TINY_CONFIG, write_random_checkpoint  # noqa: E402
from processor_fixtures import import_torchvision  # noqa: E402

import_torchvision()  # test-only torchvision (reference video processor) needs its op stub before transformers


def fresh_home(tmp_path_factory) -> str:
    """A new, empty QWEN3VL_HOME whose compiled-kernel cache is the test session's own (a link):
    a home without it would compile the kernels again in every process that loads a model there,
    minutes on a busy 2-core machine."""
    from qwen3vl import env

    path = str(tmp_path_factory.mktemp("qwen3vl_home"))
    kernels = os.path.join(env.home(), "torch_extensions")
    os.makedirs(kernels, exist_ok=True)
    os.symlink(kernels, os.path.join(path, "torch_extensions"))
    return path


@contextlib.contextmanager
def home_env(path: str):
    """QWEN3VL_HOME is ``path`` inside the block (for this process and those it starts)."""
    old = os.environ.get("QWEN3VL_HOME")
    os.environ["QWEN3VL_HOME"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("QWEN3VL_HOME", None)
        else:
            os.environ["QWEN3VL_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """The whole session uses its own QWEN3VL_HOME: tests never write converted-weight caches or
    demo checkpoints into the user's."""
    with home_env(fresh_home(tmp_path_factory)) as path:
        yield path


def tiny_config(**text_overrides) -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["text_config"].update(text_overrides)
    return cfg


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """Untied embeddings, single safetensors file."""
    return write_random_checkpoint(str(tmp_path_factory.mktemp("tiny")), tiny_config(), seed=1)


@pytest.fixture(scope="session")
def tiny_tied_sharded_ckpt(tmp_path_factory) -> str:
    """Tied embeddings (no lm_head tensor), three shards with an index."""
    cfg = tiny_config(tie_word_embeddings=True)
    cfg["tie_word_embeddings"] = True
    return write_random_checkpoint(str(tmp_path_factory.mktemp("tiny_tied")), cfg, seed=2, shards=3)


def load_reference(path: str, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return model.eval()


def fused_param(model, name: str, grad: bool = False) -> torch.Tensor:
    """Parameter ``name`` (or its gradient) as the fused layout names it (``...qkv_proj.weight``),
    also when the load split that projection into the checkpoint's parts (``SplitLinear``,
    ``...qkv_proj.parts.<i>``): the parts concatenated."""
    params = dict(model.named_parameters())
    parts = [params[name]] if name in params else []
    prefix = name.rsplit(".", 1)[0] + ".parts."
    while not parts or f"{prefix}{len(parts)}" in params:
        parts.append(params[f"{prefix}{len(parts)}"])
    tensors = [p.grad if grad else p.detach() for p in parts]
    if any(t is None for t in tensors):
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def fused_state(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with split projections' parts concatenated under ``<projection>.weight``."""
    out: dict[str, list] = {}
    for name, t in model.state_dict().items():
        head, _, tail = name.rpartition(".parts.")
        out.setdefault(f"{head}.weight" if head and tail.isdigit() else name, []).append(t)
    return {n: ts[0] if len(ts) == 1 else torch.cat(ts) for n, ts in out.items()}
