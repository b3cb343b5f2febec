"""Mapped weights and the converted-weight cache (``qwen3vl.model.weight_cache``): a model loaded
from the cache gives logits bit-identical to a copy-in load, in every format; the cache is keyed
by the checkpoint's content, a truncated or corrupt file is rebuilt, an unwritable home falls
back to a plain load, and the cache can be turned off. QWEN3VL_HOME is always a tmp folder."""
from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

import qwen3vl
from conftest import fresh_home, fused_state, tiny_config
from model_inputs import Builder, batch
from qwen3vl.model import weight_cache, weight_cache_cli
from qwen3vl.model.split_linear import SplitLinear
from qwen3vl.random_checkpoint import write_random_checkpoint

FORMATS = [("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4")]


@pytest.fixture()
def home(tmp_path_factory, monkeypatch) -> str:
    path = fresh_home(tmp_path_factory)
    monkeypatch.setenv("QWEN3VL_HOME", path)
    monkeypatch.delenv("QWEN3VL_NO_WEIGHT_CACHE", raising=False)
    return path


@pytest.fixture(scope="module")
def ckpt_bf16(tmp_path_factory) -> str:
    """A bf16 checkpoint with tied embeddings in two shards: bf16 loads map most of it in place."""
    cfg = tiny_config(tie_word_embeddings=True, dtype="bfloat16")
    cfg["tie_word_embeddings"] = True
    cfg["torch_dtype"] = "bfloat16"
    return write_random_checkpoint(str(tmp_path_factory.mktemp("wc_bf16")), cfg, seed=3, dtype=torch.bfloat16,
                                   shards=2)


def _inputs() -> dict:
    return batch(Builder(1).text(5).image(8, 12).text(7), Builder(2).text(9))


def _load(path, dtype, quantization, **kw):
    return qwen3vl.Qwen3VL.from_pretrained(path, dtype=dtype, quantization=quantization, progress=False, **kw)


def _files(home: str) -> list[str]:
    return sorted(glob.glob(os.path.join(home, "weights", "*.qwc")))


# Runtime dtype == the checkpoint's, no quantization: every tensor used where it lies (q/k/v and
# gate/up split into the checkpoint's parts), no cache file.
WHOLE = {("tiny_ckpt", "float32"), ("ckpt_bf16", "bfloat16")}


@pytest.mark.parametrize("dtype,quantization", FORMATS)
@pytest.mark.parametrize("fixture", ["tiny_ckpt", "ckpt_bf16"])
def test_cached_load_is_bit_identical(request, home, fixture, dtype, quantization, capfd):
    path = request.getfixturevalue(fixture)
    whole = (fixture, dtype) in WHOLE and quantization is None
    inputs = _inputs()
    plain = _load(path, dtype, quantization, weight_cache=False)
    expected = plain(**inputs).logits.detach()
    first = _load(path, dtype, quantization)  # builds the cache, unless mapped whole
    assert ("one time" in capfd.readouterr().err) != whole  # a first start states its conversion cost
    files = _files(home)
    assert len(files) == (0 if whole else 1)
    later = _load(path, dtype, quantization)  # maps it
    assert "one time" not in capfd.readouterr().err
    assert _files(home) == files
    split = [m for m in later.modules() if isinstance(m, SplitLinear)]
    assert len(split) == (2 * later.config.text.num_hidden_layers if whole else 0)
    for model in (first, later):
        logits = model(**inputs).logits.detach()
        if whole:  # split products: bit-identical on the CPUs measured, asserted within rounding (a
            # GEMM library may block the narrower matrices differently)
            tol = 1e-5 if dtype == "float32" else 2e-2
            assert float((logits - expected).abs().max()) <= tol * float(expected.abs().max())
        else:
            assert torch.equal(logits, expected)
        state = fused_state(model)
        assert list(state) == list(plain.state_dict())
        for n, a in plain.state_dict().items():
            assert torch.equal(a, state[n]), n
    ids = later.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ids, plain.generate(**inputs, max_new_tokens=4, do_sample=False))


def _file_range(path: str) -> tuple[int, int]:
    """The address range where this process maps the checkpoint's (first) safetensors file."""
    name = os.path.realpath(sorted(glob.glob(os.path.join(path, "*.safetensors")))[0])
    with open("/proc/self/maps") as f:
        spans = [line.split()[0] for line in f if line.rstrip().endswith(name)]
    assert spans, "the checkpoint is not mapped"
    return min(int(s.split("-")[0], 16) for s in spans), max(int(s.split("-")[1], 16) for s in spans)


def test_in_place_tensors_share_the_checkpoint_pages(home, ckpt_bf16):
    """bf16 from a bf16 checkpoint: every tensor, q/k/v and gate/up parts included, is the
    checkpoint's pages; nothing converted, no cache file."""
    _load(ckpt_bf16, "bfloat16", "int8")
    (int8,) = _files(home)
    stale = weight_cache.cache_path(ckpt_bf16, "bfloat16", "0" * 32)  # as if an older version's fused file
    shutil.copy(int8, stale)  # a valid file of this checkpoint: pruned for its name (format) alone
    model = _load(ckpt_bf16, "bfloat16", None)
    assert _files(home) == [int8]  # nothing written, the stale bf16 file pruned
    lo, hi = _file_range(ckpt_bf16)
    attn = model.model.language_model.layers[0].self_attn.qkv_proj
    assert isinstance(attn, SplitLinear) and [p.shape[0] for p in attn.parts] == [128, 64, 64]
    assert lo <= attn.parts[1].data_ptr() < hi
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied
    # copy-on-write: writing a mapped weight changes the model, never the checkpoint
    before = open(glob.glob(os.path.join(ckpt_bf16, "*.safetensors"))[0], "rb").read()
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(1)
        attn.parts[0].add_(1)
    assert open(glob.glob(os.path.join(ckpt_bf16, "*.safetensors"))[0], "rb").read() == before


def test_converted_tensors_are_cached_and_the_rest_mapped(home, ckpt_bf16):
    """bf16 checkpoint loaded in fp32: everything converted into the cache file, fused."""
    _load(ckpt_bf16, "float32", None)
    header = weight_cache._read_header(_files(home)[0])
    assert "model.language_model.layers.0.self_attn.qkv_proj.weight" in header["tensors"]
    model = _load(ckpt_bf16, "bfloat16", "int8")
    (int8,) = [fn for fn in _files(home) if "-bfloat16-int8-" in fn]
    assert "model.language_model.embed_tokens.weight" in weight_cache._read_header(int8)["in_place"]
    assert not any(isinstance(m, SplitLinear) for m in model.modules())


def _copy_ckpt(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_changed_checkpoint_invalidates(home, tmp_path, capfd):
    path = write_random_checkpoint(str(tmp_path / "a"), tiny_config(), seed=4)
    inputs = _inputs()
    _load(path, "float32", "int8")
    old = _files(home)
    write_random_checkpoint(path, tiny_config(), seed=5)  # same names and shapes, new values
    fresh = _load(path, "float32", "int8", weight_cache=False)(**inputs).logits
    capfd.readouterr()
    cached = _load(path, "float32", "int8")
    assert "one time" in capfd.readouterr().err  # rebuilt
    assert torch.equal(cached(**inputs).logits, fresh)
    assert len(_files(home)) == 1 and _files(home) != old  # the stale file was pruned
    _load(path, "float32", "int4", group_size=32)  # another format: its own file
    assert len(_files(home)) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header", "garbage"])
def test_corrupt_cache_is_rebuilt(home, tiny_ckpt, damage, capfd):
    inputs = _inputs()
    expected = _load(tiny_ckpt, "bfloat16", "int8", weight_cache=False)(**inputs).logits
    _load(tiny_ckpt, "bfloat16", "int8")
    (fn,) = _files(home)
    header = weight_cache._read_header(fn)
    size = os.path.getsize(fn)
    with open(fn, "r+b") as f:
        if damage == "truncate":
            f.truncate(size - 4096)
        elif damage == "garbage":
            f.write(b"\0" * 64)
        else:
            at = header["data"] + (size - header["data"]) // 2 if damage == "flip_data" else 200
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x10]))
    capfd.readouterr()
    model = _load(tiny_ckpt, "bfloat16", "int8")
    err = capfd.readouterr().err
    assert "unusable" in err and "rebuilding" in err and "one time" in err
    assert torch.equal(model(**inputs).logits, expected)
    weight_cache._read_header(fn)  # a good file again


def test_disabled_cache_writes_nothing(home, tiny_ckpt, monkeypatch):
    inputs = _inputs()
    a = _load(tiny_ckpt, "bfloat16", "int4", weight_cache=False)(**inputs).logits
    monkeypatch.setenv("QWEN3VL_NO_WEIGHT_CACHE", "1")
    b = _load(tiny_ckpt, "bfloat16", "int4")(**inputs).logits
    assert torch.equal(a, b)
    assert not os.path.exists(os.path.join(home, "weights"))
    monkeypatch.setenv("QWEN3VL_NO_WEIGHT_CACHE", "0")
    _load(tiny_ckpt, "bfloat16", "int4", weight_cache=False)
    assert not os.path.exists(os.path.join(home, "weights"))


def test_unwritable_home_warns_and_loads(home, tiny_ckpt, capfd):
    with open(os.path.join(home, "weights"), "w"):  # a file where the folder goes: fails even as root
        pass
    model = _load(tiny_ckpt, "float32", "int8")
    assert "cannot write" in capfd.readouterr().err
    expected = _load(tiny_ckpt, "float32", "int8", weight_cache=False)
    assert torch.equal(model(**_inputs()).logits, expected(**_inputs()).logits)


def test_full_disk_warns_and_loads(home, tiny_ckpt, monkeypatch, capfd):
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    model = _load(tiny_ckpt, "bfloat16", "int8")
    assert "No space left" in capfd.readouterr().err
    assert not glob.glob(os.path.join(home, "weights", "*"))  # no temp file left behind
    expected = _load(tiny_ckpt, "bfloat16", "int8", weight_cache=False)
    assert torch.equal(model(**_inputs()).logits, expected(**_inputs()).logits)


def test_clear(home, tiny_ckpt, capsys):
    _load(tiny_ckpt, "float32", "int8")
    assert weight_cache_cli.main([]) == 0 and "1 file(s)" in capsys.readouterr().out
    assert weight_cache_cli.main(["--clear"]) == 0 and "removed 1 file(s)" in capsys.readouterr().out
    assert not _files(home)
