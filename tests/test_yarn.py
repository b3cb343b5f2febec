"""YaRN rotary scaling of the text decoder: inverse frequencies, attention factor, fp32 logits and
greedy tokens equal to the reference (transformers' ``_compute_yarn_parameters``, as pinned), on a
tiny checkpoint whose ``original_max_position_embeddings`` (64) is short enough that YaRN changes
the frequencies, with an image placed past that length. Also the overrides: ``--rope-scaling`` /
``--max-model-len`` -> settings -> LLM -> config, and the errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

import qwen3vl
from conftest import fresh_home, load_reference, tiny_config
from model_inputs import Builder, batch, mm_token_type_ids
from qwen3vl.cli import build_parser, serve_settings
from qwen3vl.config import ConfigError, Qwen3VLConfig, RopeScaling
from qwen3vl.model.rope import yarn, yarn_attention_factor
from qwen3vl.random_checkpoint import write_random_checkpoint
from test_generate_parity import assert_greedy_matches_reference
from test_model_parity import rel_err

YARN = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64}
README_YARN = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 262144}


def yarn_config(**rope) -> dict:
    cfg = tiny_config(max_position_embeddings=256)
    cfg["text_config"]["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": [6, 5, 5], **YARN, **rope}
    return cfg


@pytest.fixture(scope="module")
def yarn_ckpt(tmp_path_factory) -> str:
    return write_random_checkpoint(str(tmp_path_factory.mktemp("tiny_yarn")), yarn_config(), seed=21)


@pytest.fixture(scope="module")
def models(yarn_ckpt):
    return qwen3vl.Qwen3VL.from_pretrained(yarn_ckpt, dtype=torch.float32), load_reference(yarn_ckpt)


def image_past_original() -> dict:
    """103 tokens; the image's tokens sit at positions 71-94, past original_max_position_embeddings."""
    return batch(Builder(31).text(70).image(8, 12).text(7))


def reference_yarn(text_config: dict) -> tuple[torch.Tensor, float]:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS["yarn"](transformers.Qwen3VLTextConfig(**text_config))


def test_inverse_frequencies_and_factor_equal_reference(models):
    ours, ref = models
    rotary = ref.model.language_model.rotary_emb
    assert rotary.rope_type == "yarn"
    assert torch.equal(ours.rope.tables.on(torch.device("cpu"))["inv_freq"], rotary.inv_freq)
    assert ours.rope.attention_factor == rotary.attention_scaling == pytest.approx(0.1 * math.log(3.0) + 1)
    plain = qwen3vl.Qwen3VL.from_config(tiny_config(), device="meta").rope.tables.on(torch.device("cpu"))["inv_freq"]
    assert not torch.equal(plain, rotary.inv_freq)  # YaRN engaged: some frequencies interpolated


@pytest.mark.parametrize("extra", [{}, {"truncate": False}, {"attention_factor": 1.25},
                                   {"mscale": 1.0, "mscale_all_dim": 0.5}, {"beta_fast": 16, "beta_slow": 2},
                                   {"factor": None}])
def test_parameter_variants_equal_reference(extra):
    text = yarn_config(**extra)["text_config"]
    inv_ref, factor_ref = reference_yarn(text)
    scaling = Qwen3VLConfig.from_dict(yarn_config(**extra)).text.rope_scaling
    inv, factor = yarn(32, 5e6, scaling)
    assert torch.equal(inv, inv_ref)
    assert factor == factor_ref


def test_readme_config_attention_factor():
    """The official README's 1M-token setting on the 2B architecture (head_dim 128, theta 5e6)."""
    cfg = Qwen3VLConfig.from_pretrained("tests/fixtures/qwen3vl-configs/Qwen3-VL-2B-Instruct")
    scaling = cfg.with_rope_scaling(README_YARN).text.rope_scaling
    assert round(yarn_attention_factor(scaling), 6) == 1.109861
    with open("tests/fixtures/qwen3vl-configs/Qwen3-VL-2B-Instruct/config.json") as f:
        text = json.load(f)["text_config"]
    text["rope_scaling"] = {**text["rope_scaling"], **README_YARN}
    inv_ref, factor_ref = reference_yarn(text)
    inv, factor = yarn(cfg.text.head_dim, cfg.text.rope_theta, scaling)
    assert torch.equal(inv, inv_ref) and factor == factor_ref


def test_logits_match_reference_past_original_length(models):
    ours, ref = models
    inputs = image_past_original()
    with torch.no_grad():
        expected = ref(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).logits
    got = ours(**inputs).logits
    assert got.shape == expected.shape
    assert rel_err(got[0], expected[0]) <= 1e-5


def test_greedy_tokens_match_reference(models):
    assert_greedy_matches_reference(*models, image_past_original())


def test_override_replaces_config(tiny_ckpt, models):
    """from_pretrained(rope_scaling=...) over a plain-RoPE checkpoint = the checkpoint written with it."""
    overridden = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, dtype=torch.float32, rope_scaling=json.dumps(YARN))
    assert overridden.config.text.rope_scaling == models[0].config.text.rope_scaling
    assert overridden.config.text.mrope_section == (6, 5, 5)
    assert torch.equal(overridden.rope.tables.on(torch.device("cpu"))["inv_freq"],
                       models[0].rope.tables.on(torch.device("cpu"))["inv_freq"])
    back = qwen3vl.Qwen3VL.from_pretrained(tiny_ckpt, rope_scaling={"rope_type": "default"})
    assert back.config.text.rope_scaling is None and back.rope.attention_factor == 1.0


def test_cli_flags_reach_the_model(tmp_path_factory, monkeypatch):
    """serve's flags -> ServeSettings -> LLM (the demo checkpoint, plain RoPE in its config.json)."""
    monkeypatch.setenv("QWEN3VL_HOME", fresh_home(tmp_path_factory))
    flag = json.dumps(YARN)
    args = build_parser().parse_args(["serve", "--rope-scaling", flag, "--max-model-len", "200"])
    settings = serve_settings(args)
    assert settings.rope_scaling == flag and settings.max_model_len == 200
    chat = build_parser().parse_args(["chat", "--rope-scaling", flag, "hi"])
    assert chat.rope_scaling == flag
    llm = qwen3vl.LLM(settings.model, rope_scaling=settings.rope_scaling, max_model_len=settings.max_model_len)
    assert llm.model.config.text.rope_scaling == RopeScaling(3.0, 64)
    assert llm.model.rope.attention_factor == pytest.approx(0.1 * math.log(3.0) + 1)
    assert llm.engine.max_model_len == 200
    assert llm.chat([{"role": "user", "content": "hi " * 80}], max_tokens=4, temperature=0).usage


@pytest.mark.parametrize("value, message", [
    ('{"rope_type": "linear", "factor": 2}', "unsupported rope_type 'linear'; supported: ['default', 'yarn']"),
    ('{"rope_type": "yarn"', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_flag_is_refused(tiny_ckpt, value, message):
    args = build_parser().parse_args(["serve", "--model", tiny_ckpt, "--rope-scaling", value])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        serve_settings(args)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported text rope_type 'dynamic'; supported"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}, "factor must be >= 1"),
    ({"rope_type": "yarn", "factor": "3", "original_max_position_embeddings": 64}, "factor must be a positive"),
])
def test_bad_config_is_refused(rope, message):
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_dict(tiny_config()).with_rope_scaling(rope)
    cfg = tiny_config()
    cfg["text_config"]["rope_scaling"] = {"mrope_section": [6, 5, 5], **rope}
    with pytest.raises(ConfigError, match=message):
        Qwen3VLConfig.from_dict(cfg)
