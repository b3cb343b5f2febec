"""LLM API (batching, streaming, stops, usage) and the CLI end to end, on the demo checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qwen3vl
from conftest import fresh_home, home_env
from qwen3vl.engine.api import EngineStats, PromptTooLong, SamplingParams
from qwen3vl.engine.request import Request

IMAGE_MSG = None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with home_env(fresh_home(tmp_path_factory)) as path:
        yield path


@pytest.fixture(scope="module")
def llm(home):
    return qwen3vl.LLM(max_num_seqs=4)


def image_message(text="Describe it."):
    from PIL import Image

    img = Image.new("RGB", (64, 96), (200, 30, 30))
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]


def test_demo_is_labelled_and_uses_real_tokenizer(llm):
    assert llm.is_demo
    with open(os.path.join(llm.path, "DONE")) as f:
        assert f.read().startswith("real tokenizer")


def test_chat_usage_counts_and_greedy_matches_model_generate(llm):
    msgs = image_message()
    res = llm.chat(msgs, max_tokens=16, temperature=0, presence_penalty=0)  # the Instruct default is 1.5
    batch = llm.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
    n_img = int((batch["input_ids"] == 151655).sum())
    assert res.usage.prompt_tokens == batch["input_ids"].shape[1]
    assert res.usage.image_tokens == n_img > 0 and res.usage.video_tokens == 0
    assert res.usage.completion_tokens == len(res.token_ids) == 16 and res.finish_reason == "length"
    ids = llm.model.generate(**batch, max_new_tokens=16, do_sample=False)
    assert ids[0, batch["input_ids"].shape[1]:].tolist() == res.token_ids
    assert res.text == llm.processor.decode(res.token_ids, skip_special_tokens=True)


def test_batched_chat_equals_one_at_a_time(llm):
    convs = [image_message("one"), [{"role": "user", "content": "two"}], image_message("three four")]
    together = llm.chat(convs, max_tokens=12, temperature=0)
    alone = [llm.chat(c, max_tokens=12, temperature=0) for c in convs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_stream_concatenates_to_chat(llm):
    msgs = [{"role": "user", "content": "Tell me a story."}]
    full = llm.chat(msgs, max_tokens=40, temperature=0)
    deltas = list(llm.stream_chat(msgs, max_tokens=40, temperature=0))
    assert "".join(d.text for d in deltas) == full.text
    assert deltas[-1].result.token_ids == full.token_ids and not any(d.finished for d in deltas[:-1])


def test_stop_string_and_stop_id(llm):
    msgs = [{"role": "user", "content": "Count."}]
    base = llm.chat(msgs, max_tokens=30, temperature=0)
    stop = base.text[10:14]
    assert stop and stop not in base.text[:10]
    cut = llm.chat(msgs, max_tokens=30, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.index(stop)]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    by_id = llm.chat(msgs, max_tokens=30, temperature=0, stop_token_ids=[stop_id])
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: first + 1]


def test_seeded_sampling_reproducible(llm):
    msgs = [{"role": "user", "content": "Random?"}]
    a = llm.chat(msgs, max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    b = llm.chat(msgs, max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    c = llm.chat(msgs, max_tokens=20, temperature=1.0, top_k=0, top_p=1.0, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_streaming_never_splits_a_character(llm):
    tok = llm.processor.tokenizer
    text = "naïve 𓀀𓁿 龘𝔘 你好, ok"
    ids = tok.encode(text)
    # Rare characters are made of byte tokens that are not valid UTF-8 alone: the split is real.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    req = Request({"input_ids": torch.tensor([[1, 2]])}, SamplingParams(max_new_tokens=len(ids), stop_token_ids=()),
                  tok, 151655, 151656)
    pieces = [req.add_token(i).text for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert req.result.finish_reason == "length" and req.result.text == text


def test_too_long_prompt_is_a_clear_error(home):
    small = qwen3vl.LLM(max_model_len=32)
    with pytest.raises(ValueError, match="maximum model length is 32") as info:
        small.chat([{"role": "user", "content": "word " * 50}], max_tokens=4)
    assert isinstance(info.value, PromptTooLong) and info.value.limit == 32 and info.value.prompt_tokens > 32
    req = small.prompt_request("hi", small.sampling_params(max_tokens=100))
    assert req.params.max_new_tokens == 32 - req.prompt_len  # the budget is shortened to what fits


def run_cli(args, stdin="", home=None):
    env = dict(os.environ, QWEN3VL_HOME=home)
    return subprocess.run([sys.executable, "-m", "qwen3vl.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_one_shot(home, tmp_path):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (40, 50), (255, 0, 0)).save(img)
    p = run_cli(["chat", "--max-new-tokens", "8", "--temperature", "0", "--image", str(img), "What", "color?"], home=home)
    assert p.returncode == 0, p.stderr
    assert "random weights: output is noise" in p.stderr
    assert p.stdout.strip()
    missing = run_cli(["chat", "--image", str(tmp_path / "nope.png"), "hi"], home=home)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_cli_scripted_repl(home, tmp_path):
    from PIL import Image

    img = tmp_path / "blue.png"
    Image.new("RGB", (40, 50), (0, 0, 255)).save(img)
    script = f"hello\n/image {img}\nwhat is this?\n/bogus\n/reset\nagain\n"
    p = run_cli(["chat", "--max-new-tokens", "4", "--temperature", "0"], stdin=script, home=home)
    assert p.returncode == 0, p.stderr
    assert f"[image attached: {img}]" in p.stdout and "[conversation cleared]" in p.stdout
    assert "unknown command /bogus" in p.stderr
    answers = [line for line in p.stdout.splitlines() if not line.startswith("[")]
    assert len(answers) == 3  # one reply per question


def test_model_generate_stream_concatenates_to_generate(llm):
    model, proc = llm.model, llm.processor
    convs = [image_message("stream"), [{"role": "user", "content": "another one"}]]
    batch_ = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt", padding_side="left")
    t = batch_["input_ids"].shape[1]
    ids = model.generate(**batch_, max_new_tokens=24, do_sample=False)
    pieces = list(model.generate_stream(proc, **batch_, max_new_tokens=24, do_sample=False))
    for row in range(2):
        streamed = "".join(p[row] for p in pieces)
        assert streamed == proc.decode(ids[row, t:], skip_special_tokens=True)
    single = proc.apply_chat_template(convs[1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")
    parts = list(model.generate_stream(proc, **single, max_new_tokens=5, do_sample=False))
    assert all(isinstance(p, str) for p in parts) and len(parts) == 5


def test_cli_bench_runs_on_tiny(home):
    p = run_cli(["bench", "--arch", "tiny", "--skip-reference", "--new-tokens", "2", "--context", "16",
                 "--dtype", "float32"], home=home)
    assert p.returncode == 0, p.stderr
    import json

    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["runs"]["ours:float32"]["decode_b1_tok_s"] > 0
    assert "decode_b1_tok_s" in p.stdout  # the table precedes the JSON line


def test_bench_without_transformers_says_what_to_do(monkeypatch, capsys):
    """The reference side needs the test extra; without it the harness stops before any work
    with a message naming the fix, not an ImportError from a worker process."""
    import importlib.util

    from qwen3vl import bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    monkeypatch.setattr(bench, "checkpoint", lambda *a: pytest.fail("wrote a checkpoint before checking"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--arch", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs transformers" in err and "--skip-reference" in err


def test_bench_reference_outside_a_source_checkout_says_what_to_do(monkeypatch, capsys, tmp_path):
    """The reference loader is not part of the package (bench/reference_worker.py); an installed
    package without the checkout must say so and point at --skip-reference."""
    from qwen3vl import bench

    monkeypatch.setattr(bench, "REFERENCE_WORKER", str(tmp_path / "missing.py"))
    monkeypatch.setattr(bench, "checkpoint", lambda *a: pytest.fail("wrote a checkpoint before checking"))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--arch", "tiny"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "source checkout" in err and "--skip-reference" in err


def test_chat_with_video_reports_frames_and_video_tokens(llm, tmp_path):
    import av
    import numpy as np

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 30, np.uint8), format="rgb24")
            out.mux(s.encode(frame))
        out.mux(s.encode())
    msgs = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "?"}]}]
    res = llm.chat(msgs, max_tokens=4, temperature=0, mm_processor_kwargs={"fps": 2})
    assert res.usage.video_tokens > 0 and res.usage.image_tokens == 0
    meta = res.metadata["video_metadata"][0]
    assert len(meta["frames_indices"]) == 4  # 2 s at 2 fps
    with pytest.raises(ValueError, match="unknown media option"):
        llm.chat(msgs, max_tokens=2, mm_processor_kwargs={"min_frames": 2})


def test_aborting_a_waiting_request_delivers_its_final_delta(home):
    small = qwen3vl.LLM(max_num_seqs=1)
    params = small.sampling_params(max_tokens=5, temperature=0)
    a = small.request([{"role": "user", "content": "first"}], params)
    b = small.request([{"role": "user", "content": "second"}], params)
    got = []
    small.engine.submit(a)
    small.engine.submit(b, got.append)
    small.engine.step()  # a takes the only slot; b waits
    assert small.engine.stats() == EngineStats(running=1, waiting=1)
    small.engine.cancel(b)
    assert small.engine.stats().waiting == 0  # a cancelled request no longer counts as waiting
    small.engine.step()
    assert got and got[-1].finished and got[-1].result.finish_reason == "abort"
    assert b.id not in small.engine._listeners
    small.engine.run_until_done([a])
    assert a.result.finish_reason == "length"


def test_engine_requests_take_the_checkpoints_stop_ids(llm):
    engine = llm.engine
    assert engine.stop_token_ids == (151645, 151643)  # the demo checkpoint's generation_config.json
    ids = llm.processor(text="hello", return_tensors="pt")["input_ids"]
    req = engine.new_request({"input_ids": ids}, SamplingParams(max_new_tokens=3))
    assert req.params.stop_token_ids == engine.stop_token_ids and not req.shares_prompt
    own = engine.new_request({"input_ids": ids}, SamplingParams(max_new_tokens=3, stop_token_ids=[5]),
                             shares_prompt=True)
    assert own.params.stop_token_ids == (5,) and own.shares_prompt
    engine.submit(req)
    engine.submit(own)
    engine.run_until_done([req, own])
    assert engine.stats() == EngineStats(running=0, waiting=0)
    assert req.result.usage.prompt_tokens == own.result.usage.prompt_tokens == ids.shape[1]
