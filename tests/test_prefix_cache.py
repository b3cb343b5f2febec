"""Prefix cache and vision encoder cache: outputs and fp32 first-token logits equal a cache-less
run, while each chat turn prefills only what the cache does not hold (demo checkpoint: tiny fp32
random weights, the real tokenizer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qwen3vl
from conftest import fresh_home, home_env
from processor_fixtures import write_video
from qwen3vl.engine.engine import Engine
from qwen3vl.engine.kv_cache import KVCache
from qwen3vl.engine.prefix_cache import PrefixCache

BLOCK = 16
REL = 1e-5
IMAGE_PAD = 151655
# A question of more than a block of tokens: the media before it end inside the reused prefix.
LONG = "Please describe everything you can see here, in as much detail as you can possibly manage."


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with home_env(fresh_home(tmp_path_factory)):
        yield qwen3vl.LLM(max_num_seqs=4)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(str(tmp_path_factory.mktemp("clip") / "clip.mp4"), 8, fps=4, width=64, height=64)


def noise(seed: int, size=(64, 96)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def block_bytes(llm) -> int:
    t = llm.model.config.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * BLOCK * t.head_dim * 4  # fp32 keys + values


class Chat:
    """A conversation at the token level: turn k+1's prompt is turn k's prompt + its answer + the
    new user message (as the chat template writes it), the media accumulating in order."""

    def __init__(self, llm):
        self.llm, self.ids = llm, []
        self.media = {"pixel_values": [], "image_grid_thw": [], "pixel_values_videos": [], "video_grid_thw": []}

    def user(self, *content) -> "Chat":
        parts = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
        seg = self.llm.processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True, return_tensors="pt", fps=2)
        self.ids += seg["input_ids"][0].tolist()
        for key, items in self.media.items():
            if seg.get(key) is not None:
                items.append(seg[key])
        return self

    def answer(self, token_ids: list[int]) -> None:
        self.ids += token_ids

    def inputs(self) -> dict:
        out = {"input_ids": torch.tensor([self.ids])}
        out.update({k: torch.cat(v) for k, v in self.media.items() if v})
        return out


def run(engine: Engine, llm, inputs: dict, n: int = 1, tokens: int = 6):
    """n choices of one prompt (greedy) -> (requests, first-token logits of each (V,))."""
    params = llm.sampling_params(max_tokens=tokens, min_new_tokens=tokens, temperature=0, presence_penalty=0)
    reqs = [engine.new_request(inputs, params, shares_prompt=i > 0) for i in range(n)]
    first: dict[int, torch.Tensor] = {}

    def capture(requests, logits, processed):
        for i, r in enumerate(requests):
            first.setdefault(r.id, logits[i].clone())

    engine.on_logits = capture
    for r in reqs:
        engine.submit(r)
    engine.run_until_done(reqs)
    engine.on_logits = None
    assert all(r.error is None for r in reqs)
    return reqs, [first[r.id] for r in reqs]


def assert_same(got, want) -> None:
    """Same greedy tokens, first-token logits within REL of the cache-less run's."""
    (a, la), (b, lb) = got, want
    assert [r.result.token_ids for r in a] == [r.result.token_ids for r in b]
    for x, y in zip(la, lb):
        assert float((x - y).abs().max()) <= REL * float(y.abs().max())


def engines(llm, **kw) -> tuple[Engine, Engine]:
    return (Engine(llm.model, llm.processor, 4, prefix_block_size=BLOCK, **kw),
            Engine(llm.model, llm.processor, 4, enable_prefix_caching=False))


def play(llm, cached: Engine, plain: Engine, turns: list) -> list[tuple[int, int, int]]:
    """Run a chat's turns (each a text or a tuple of content items) on both engines, checking one
    against the other -> per turn (prompt tokens, cached tokens, tokens prefilled)."""
    chat, stats = Chat(llm), []
    for turn in turns:
        chat.user(*(turn if isinstance(turn, tuple) else (turn,)))
        before = cached.runner.prefilled_tokens
        got, want = run(cached, llm, chat.inputs()), run(plain, llm, chat.inputs())
        assert_same(got, want)
        usage = got[0][0].result.usage
        stats.append((usage.prompt_tokens, usage.cached_tokens, cached.runner.prefilled_tokens - before))
        chat.answer(got[0][0].result.token_ids)
    return stats


def assert_turns_prefill_only_new_tokens(stats) -> None:
    """From turn 2 on, everything up to the last full block of the previous turn's sequence
    (prompt + answer but its last token, whose keys were never computed) is reused."""
    for (t0, _, _), (t1, cached, prefilled) in zip(stats, stats[1:]):
        assert cached == (t0 + 6 - 1) // BLOCK * BLOCK > 0
        assert prefilled == t1 - cached < t1 - t0 + BLOCK
    assert stats[0][1] == 0 and stats[0][2] == stats[0][0]


def test_text_chat_turns_prefill_only_new_tokens(llm):
    stats = play(llm, *engines(llm), ["Hello there, how are you?", "Tell me more.", "And then?"])
    assert_turns_prefill_only_new_tokens(stats)


def test_image_chat_encodes_each_image_once(llm):
    cached, plain = engines(llm)
    a, b = {"type": "image", "image": noise(1)}, {"type": "image", "image": noise(2)}  # same size
    stats = play(llm, cached, plain, [(a, LONG), "More.", (b, LONG), "Compare them."])
    assert_turns_prefill_only_new_tokens(stats)
    assert cached.encoders.encoded == 2


def test_video_and_mixed_chat(llm, clip):
    cached, plain = engines(llm)
    video = ({"type": "video", "video": clip}, LONG)
    stats = play(llm, cached, plain, [({"type": "image", "image": noise(3)}, LONG), video, "Both?", "Why?"])
    assert_turns_prefill_only_new_tokens(stats)
    assert cached.encoders.encoded == 2


def test_image_at_another_position_reuses_its_features(llm):
    cached, plain = engines(llm)
    image = {"type": "image", "image": noise(4)}
    play(llm, cached, plain, [(image, "Describe it.")])
    stats = play(llm, cached, plain, ["A different opening question.", (image, "Now this.")])
    assert cached.encoders.encoded == 1  # seen in the first chat, at another position
    assert stats[1][1] > 0  # the second chat's own first turn is reused


def test_same_size_images_do_not_collide(llm):
    """Same tokens and grid, other pixels: the text before the image is reused, nothing after."""
    cached, plain = engines(llm)
    first = play(llm, cached, plain, [(LONG, {"type": "image", "image": noise(5)}, "Describe it.")])
    stats = play(llm, cached, plain, [(LONG, {"type": "image", "image": noise(6)}, "Describe it.")])
    ids = Chat(llm).user(LONG, {"type": "image", "image": noise(6)}, "Describe it.").ids
    assert stats[0][0] == first[0][0]
    assert stats[0][1] == ids.index(IMAGE_PAD) // BLOCK * BLOCK > 0


def test_cut_inside_an_image_takes_the_rest_of_its_features(llm):
    """A pool of 3 blocks keeps the head of the prompt only, ending inside the image run; the tail
    prefill adds the image's remaining rows (and their DeepStack features), cached or encoded."""
    for encoder_gb in (0.5, 0.0):
        cached, plain = engines(llm, prefix_cache_gb=3 * block_bytes(llm) / 2**30, encoder_cache_gb=encoder_gb)
        image = {"type": "image", "image": noise(7)}
        play(llm, cached, plain, [(image, "Describe it.")])
        ids = Chat(llm).user(image, "Another question.").ids
        stats = play(llm, cached, plain, [(image, "Another question.")])
        assert stats[0][1] == 3 * BLOCK and ids[3 * BLOCK] == IMAGE_PAD and ids[3 * BLOCK - 1] == IMAGE_PAD
        assert len(cached.prefix) == 3
        assert cached.encoders.encoded == (1 if encoder_gb else 2)


def test_media_inside_the_cached_prefix_are_not_encoded(llm, clip):
    cached, plain = engines(llm, encoder_cache_gb=0)
    video = ({"type": "video", "video": clip}, LONG)
    stats = play(llm, cached, plain, [({"type": "image", "image": noise(8)}, LONG), video, "Go on.", "Again."])
    assert_turns_prefill_only_new_tokens(stats)
    assert cached.encoders.encoded == 2 and len(cached.encoders) == 0


def test_n_choices_share_one_prefill(llm):
    cached, plain = engines(llm)
    inputs = Chat(llm).user({"type": "image", "image": noise(9)}, "Describe it in detail.").inputs()
    t = inputs["input_ids"].shape[1]
    got = run(cached, llm, inputs, n=3)
    assert_same(got, run(plain, llm, inputs, n=3))
    reused = (t - 1) // BLOCK * BLOCK
    assert [r.result.usage.cached_tokens for r in got[0]] == [0, reused, reused]
    assert cached.runner.prefilled_tokens == t + 2 * (t - reused)  # the prompt's head prefilled once
    assert cached.encoders.encoded == 1


def test_eviction_under_a_tiny_budget_stays_exact(llm, clip):
    cached, plain = engines(llm, prefix_cache_gb=5 * block_bytes(llm) / 2**30, encoder_cache_gb=1e-6)
    turns = [({"type": "image", "image": noise(10)}, "Look."), "More.", ({"type": "video", "video": clip}, "Go."),
             "Again.", "And?"]
    stats = play(llm, cached, plain, turns)
    assert len(cached.prefix) == 5 and len(cached.encoders) == 0
    assert all(c <= 5 * BLOCK for _, c, _ in stats) and any(c for _, c, _ in stats[1:])


def test_caching_off_reports_no_cached_tokens(llm):
    plain = Engine(llm.model, llm.processor, 4, enable_prefix_caching=False)
    stats = play(llm, plain, plain, ["Hello there, how are you?", "Tell me more."])
    assert [c for _, c, _ in stats] == [0, 0] and [p for p, _, _ in stats] == [t for t, _, _ in stats]


def test_llm_chat_turns_hit_through_the_chat_template(llm):
    msgs = [{"role": "user", "content": [{"type": "image", "image": noise(11)}, {"type": "text", "text": "Hi."}]}]
    first = llm.chat(msgs, max_tokens=6, temperature=0)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More?"}]
    second = llm.chat(msgs, max_tokens=6, temperature=0)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens // BLOCK * BLOCK
    off = qwen3vl.LLM(enable_prefix_caching=False)
    assert off.engine.prefix is None
    again = off.chat(msgs, max_tokens=6, temperature=0)
    assert again.token_ids == second.token_ids and again.usage.cached_tokens == 0


def test_pool_evicts_least_recent_chains_tail_first(llm):
    cfg = llm.model.config.text
    cache = KVCache(cfg, 1, 8 * BLOCK, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    pool = PrefixCache(cfg, 3 * block_bytes(llm), BLOCK, torch.float32, "cpu")
    pool.save(cache, 0, [b"a", b"b", b"c", b"d"])  # only 3 fit; a chain never evicts itself
    assert pool.match([b"a", b"b", b"c", b"d"]) == [0, 1, 2]
    pool.save(cache, 0, [b"x"])  # evicts the deepest block of the older chain
    assert len(pool.match([b"a", b"b", b"c"])) == 2 and pool.match([b"x"])
    k, v = cache.k.clone(), cache.v.clone()
    cache.k.zero_()
    cache.v.zero_()
    assert pool.load(cache, 0, pool.match([b"a", b"b"])) == 2 * BLOCK
    assert torch.equal(cache.k[:, 0, :, : 2 * BLOCK], k[:, 0, :, : 2 * BLOCK])
    assert torch.equal(cache.v[:, 0, :, : 2 * BLOCK], v[:, 0, :, : 2 * BLOCK])
