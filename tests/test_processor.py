"""Parity of qwen3vl.processor with transformers' Qwen3VLProcessor (images, text, chat template)."""
from __future__ import annotations

import base64
import os

import numpy as np
import pytest
import torch
from PIL import Image

from processor_fixtures import (jpeg_bytes, make_reference_processor, pil_processor, pil_reference,  # noqa: F401
                                processor, processor_dir,
                                random_image, reference)


@pytest.fixture(scope="module")
def ref(reference):
    reference.tokenizer.padding_side = "right"  # transformers' default, ours too
    return reference


# The calls below were written for our old defaults; transformers' (now ours) return the prompt string.
OLD_DEFAULTS = dict(add_generation_prompt=True, tokenize=True, return_dict=True)


def act(proc, conversation, **kw):
    return proc.apply_chat_template(conversation, **{**OLD_DEFAULTS, **kw})


def run_both(ours, ref, conversation, **kw):
    a = act(ours, conversation, add_generation_prompt=True, **kw)
    b = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                return_tensors="pt", padding=True, **kw)
    return a, b


def assert_same(a, b, tol=0.0):
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        if key in b:
            assert key in a, key
            assert torch.equal(a[key], b[key]), key
    assert ("pixel_values" in a) == ("pixel_values" in b)
    if "pixel_values" in b:
        assert a["pixel_values"].dtype == torch.float32
        assert a["pixel_values"].shape == b["pixel_values"].shape
        assert (a["pixel_values"] - b["pixel_values"]).abs().max().item() <= tol


def user(*blocks):
    return {"role": "user", "content": list(blocks)}


def img(image):
    return {"type": "image", "image": image}


def txt(text):
    return {"type": "text", "text": text}


@pytest.mark.parametrize("size", [(20, 30), (30, 20), (33, 97), (224, 224), (3, 450), (450, 3), (641, 479)])
def test_image_sizes(processor, ref, size):
    conv = [user(img(random_image(*size, seed=sum(size))), txt("Describe."))]
    a, b = run_both(processor, ref, conv)
    assert_same(a, b)


def test_large_image(processor, ref):
    conv = [user(img(random_image(3000, 2400, seed=3)), txt("Describe."))]
    a, b = run_both(processor, ref, conv)
    assert_same(a, b)
    assert a["image_grid_thw"].tolist() == [[1, 150, 188]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_image_modes(processor, ref, mode):
    conv = [user(img(random_image(90, 70, mode=mode, seed=5)), txt("What?"))]
    a, b = run_both(processor, ref, conv)
    assert_same(a, b)


def test_palette_with_transparency(processor, ref):
    image = random_image(64, 64, mode="P", seed=9)
    image.info["transparency"] = 0
    a, b = run_both(processor, ref, [user(img(image), txt("?"))])
    assert_same(a, b)


def test_exif_rotated_jpeg_path(pil_processor, pil_reference, tmp_path):
    """(The PIL backend on both sides: the torchvision backend reads files with torchvision's image
    extension, which does not load beside the CPU torch here.)"""
    image = random_image(80, 40, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = str(tmp_path / "rotated.jpg")
    open(path, "wb").write(jpeg_bytes(image, exif=exif))
    a, b = run_both(pil_processor, pil_reference, [user(img(path), txt("?"))])
    assert_same(a, b)
    # the upright image is 40 wide, 80 tall: more rows than columns in the grid
    grid = a["image_grid_thw"][0].tolist()
    assert grid[1] > grid[2]


@pytest.mark.parametrize("size", [(97, 61), (34, 200), (640, 480), (1000, 700)], ids=str)
def test_pil_backend_matches_reference_pil_backend(pil_processor, pil_reference, size):
    """``use_fast=False``: resize and normalisation as transformers' PIL image backend."""
    image = random_image(*size, seed=sum(size))
    a, b = run_both(pil_processor, pil_reference, [user(img(image), txt("?"))])
    assert_same(a, b, tol=0.0)


def test_sources_path_file_url_data_url(processor, ref, tmp_path):
    image = random_image(50, 70, seed=4)
    path = str(tmp_path / "x.png")
    image.save(path)
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    conv = [user(img(path), {"type": "image", "url": "file://" + path},
                 {"type": "image", "path": path}, img("data:image/png;base64," + data), txt("same?"))]
    a = act(processor, conv)
    b = ref.apply_chat_template([user(img(image), img(image), img(image), img(image), txt("same?"))],
                                add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert_same(a, b)


def test_numpy_and_torch_images(processor):
    image = random_image(64, 48, seed=8)
    arr = np.asarray(image)
    conv = [user(img(image), img(arr), img(torch.from_numpy(arr.copy()).permute(2, 0, 1)), txt("?"))]
    out = act(processor, conv)
    n = out["pixel_values"].shape[0] // 3
    pv = out["pixel_values"]
    assert torch.equal(pv[:n], pv[n:2 * n]) and torch.equal(pv[:n], pv[2 * n:])


def test_rgba_file_is_composited_on_white(processor, tmp_path):
    # fully transparent black pixels must come out white (the reference drops alpha on files)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    path = str(tmp_path / "t.png")
    rgba.save(path)
    out = act(processor, [user(img(path), txt("?"))])
    assert torch.allclose(out["pixel_values"], torch.ones_like(out["pixel_values"]))


def test_conversation_features(processor, ref):
    a_img, b_img = random_image(40, 60, seed=11), random_image(100, 30, seed=12)
    conv = [
        {"role": "system", "content": "You are a helpful assistant."},
        user(img(a_img), img(b_img), txt("Compare these two pictures.")),
        {"role": "assistant", "content": "The first is taller."},
        user(txt("请用中文再说一遍，谢谢！"), img(a_img)),
    ]
    a, b = run_both(processor, ref, conv)
    assert_same(a, b)
    a, b = run_both(processor, ref, conv, add_vision_id=True)
    assert_same(a, b)
    assert "Picture 3:" in act(processor, conv, tokenize=False, add_vision_id=True)


def test_text_only_and_string_content(processor, ref):
    conv = [{"role": "user", "content": "Hello, 世界! Ünïcödé ✓ 🙂"}]
    a, b = run_both(processor, ref, conv)
    assert_same(a, b)
    assert "pixel_values" not in a
    assert act(processor, conv, tokenize=False) == ref.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=False)


def test_tools_in_template(processor, ref):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city <b>",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    conv = [{"role": "system", "content": "Be brief."}, user(txt("Weather in Paris?")),
            {"role": "assistant", "content": "",
             "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21°C"}]
    ours = act(processor, conv, tokenize=False, tools=tools)
    theirs = ref.apply_chat_template(conv, add_generation_prompt=True, tokenize=False, tools=tools)
    assert ours == theirs
    assert "<tools>" in ours and "<b>" in ours
    a, b = run_both(processor, ref, conv, tools=tools)
    assert_same(a, b)


def test_batch_left_padding(processor, ref):
    convs = [[user(img(random_image(64, 64, seed=1)), txt("Describe this image in detail please."))],
             [user(txt("Hi"))],
             [user(img(random_image(30, 90, seed=2)), img(random_image(90, 30, seed=3)), txt("Two."))]]
    a, b = run_both(processor, ref, convs, padding_side="left")  # the default is now right, as transformers'
    assert_same(a, b)
    mask = a["attention_mask"]
    assert mask[1, 0] == 0 and mask[:, -1].all()  # left padding: real tokens end every row
    assert (a["input_ids"][mask == 0] == 151643).all()
    right = act(processor, convs, padding_side="right")
    assert right["attention_mask"][:, 0].all()
    texts = act(processor, convs, tokenize=False)
    assert isinstance(texts, list) and len(texts) == 3


def test_openai_format(processor, tmp_path):
    image = random_image(64, 48, seed=6)
    path = str(tmp_path / "o.png")
    image.save(path)
    hf = act(processor, [user(img(image), txt("What is it?"))])
    oa = act(processor, [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "file://" + path}}]}])
    qwen_no_type = act(processor, [user({"image": path}, {"text": "What is it?"})])
    assert torch.equal(hf["pixel_values"], oa["pixel_values"])
    assert torch.equal(hf["input_ids"], qwen_no_type["input_ids"])


def test_per_item_and_per_call_pixel_budget(processor, ref):
    image = random_image(1000, 800, seed=7)
    small = act(processor, [user(img(image), txt("?"))], max_pixels=128 * 128)
    # 1000x800 px, budget 16384: beta = sqrt(800000/16384) = 6.99 -> 96 x 128 px -> grid 6 x 8
    assert small["image_grid_thw"].tolist() == [[1, 6, 8]]
    item = act(processor, [user({"type": "image", "image": image, "max_pixels": 128 * 128},
                                               txt("?"))])
    assert torch.equal(small["pixel_values"], item["pixel_values"])
    fixed = act(processor, [user({"type": "image", "image": image, "resized_height": 300,
                                                 "resized_width": 500}, txt("?"))])
    assert fixed["image_grid_thw"].tolist() == [[1, 18, 32]]  # 288 x 512 px
    b = ref.apply_chat_template([user(img(image), txt("?"))], add_generation_prompt=True, tokenize=True,
                                return_dict=True, return_tensors="pt",
                                processor_kwargs={"size": {"shortest_edge": 65536, "longest_edge": 128 * 128}})
    assert_same(small, b)


def test_call_with_text_and_images(processor, ref):
    image = random_image(120, 90, seed=10)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
    a = processor(text=[text], images=[image])
    b = ref(text=[text], images=[image], return_tensors="pt")
    assert_same(a, b)
    with pytest.raises(ValueError):
        processor(text=[text], images=None)


def test_decode_and_tokenizer(processor, ref):
    conv = [user(txt("Bonjour 你好 🙂"))]
    ids = act(processor, conv)["input_ids"]
    assert processor.decode(ids[0]) == ref.tokenizer.decode(ids[0])
    assert processor.batch_decode(ids, skip_special_tokens=True) == ref.tokenizer.batch_decode(
        ids, skip_special_tokens=True)
    extra = [151667, 151668, 151657, 151658]  # <think></think><tool_call></tool_call>
    assert processor.decode(extra, skip_special_tokens=True) == ref.tokenizer.decode(extra, skip_special_tokens=True)
    assert processor.tokenizer.pad_token_id == 151643 and processor.tokenizer.eos_token_id == 151645
    assert processor.tokenizer.encode("<think>") == [151667]


def test_package_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, qwen3vl.processor as p; p.Processor; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__))).returncode == 0


def test_template_sources(processor_dir, tmp_path):
    import shutil

    from qwen3vl.processor import Processor

    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    expected = act(Processor.from_pretrained(processor_dir), conv, tokenize=False)
    for drop in (("chat_template.jinja",), ("chat_template.jinja", "chat_template.json")):
        folder = tmp_path / "_".join(drop)
        shutil.copytree(processor_dir, folder)
        for name in drop:
            os.remove(folder / name)
        assert act(Processor.from_pretrained(str(folder)), conv, tokenize=False) == expected


def test_batch_feature_and_plain_lists(processor):
    conv = [user(txt("Hi")), ]
    out = act(processor, conv)
    assert out.input_ids is out["input_ids"] and out.input_ids.shape[0] == 1
    moved = out.to("cpu")
    assert torch.equal(moved.input_ids, out.input_ids)
    plain = act(processor, conv, return_tensors=None)
    assert plain["input_ids"] == out["input_ids"].tolist()
    ids_only = act(processor, conv, return_dict=False)
    assert torch.equal(ids_only, out["input_ids"])
    with pytest.raises(ValueError):
        act(processor, [[user(txt("a"))], [user(txt("much longer text here"))]], padding=False)


def test_continue_final_message(processor, ref):
    conv = [user(txt("Count to three.")), {"role": "assistant", "content": "One, two,"}]
    ours = act(processor, conv, tokenize=False, add_generation_prompt=False,
                                         continue_final_message=True)
    theirs = ref.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert ours == theirs and ours.endswith("One, two,")


def test_one_media_part_parser_for_both_forms():
    from qwen3vl.processor.options import parse_media_part

    url = {"type": "image_url", "image_url": {"url": "a.png", "max_pixels": 4096, "detail": "low"}, "min_pixels": 1}
    part = parse_media_part(url)
    assert (part.kind, part.source, part.key, part.options) == ("image", "a.png", "image_url.url",
                                                                {"max_pixels": 4096, "min_pixels": 1})
    assert parse_media_part({"type": "video_url", "video_url": "v.mp4", "fps": 2}).options == {"fps": 2}
    assert parse_media_part({"type": "video_url", "video_url": "v.mp4"}).key == "video_url"
    assert parse_media_part({"path": "x", "type": "image"}).key == "path"
    assert parse_media_part({"video": ["f1.png", "f2.png"]}).kind == "video"
    assert parse_media_part({"type": "text", "text": "hi"}) is None


def test_openai_part_options_and_missing_source(processor):
    from qwen3vl.processor import UnsupportedMediaError

    image = random_image(1000, 800, seed=7)
    part = {"type": "image_url", "image_url": {"url": image, "max_pixels": 128 * 128}}
    assert act(processor, [user(part, txt("?"))])["image_grid_thw"].tolist() == [[1, 6, 8]]
    with pytest.raises(UnsupportedMediaError, match="names no source"):
        act(processor, [user({"type": "image_url"}, txt("?"))])


def test_vision_tokens_come_from_the_tokenizer(processor):
    assert processor.image_token == "<|image_pad|>" and processor.image_token_id == 151655
    assert processor.video_token_id == 151656 and processor.vision_start_token_id == 151652
    tok = processor.tokenizer
    assert tok.special_token("image_token", "<|image_pad|>") == "<|image_pad|>"
    old = tok.config
    tok.config = {**old, "extra_special_tokens": {"image_token": "<|vision_pad|>"}}
    try:
        assert tok.special_token("image_token", "<|image_pad|>") == "<|vision_pad|>"
    finally:
        tok.config = old
