"""The Qwen3-VL model: vision encoder + text decoder + lm_head, with the public entry points
``Qwen3VL.from_pretrained``, ``Qwen3VL.from_config`` and ``model(**batch).logits``.

Module names mirror the released checkpoint (``model.visual``, ``model.language_model``,
``lm_head``) so the name table in ``weights.py`` stays a near-identity.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Qwen3VLConfig
from ..weights import load_checkpoint
from .positions import PlaceholderMismatch, mrope_positions
from .rope import TextRope
from .text import MLP, Attention, AttnContext, Linear, SparseMoE, TextDecoder
from .vision import VisionAttention, VisionEncoder, VisionMLP

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, config: Qwen3VLConfig) -> torch.dtype:
    """'auto' -> the checkpoint's dtype; strings or torch dtypes otherwise."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    name = config.torch_dtype if dtype in (None, "auto") else str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[name]


def resolve_model_path(path: str) -> str:
    """A local folder, or a hub id resolved through the local Hugging Face cache
    (downloading only when the network allows)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; expected a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"no folder {path!r} (and huggingface_hub is not installed to resolve hub ids)") from e
    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(path)
    except Exception as e:
        raise FileNotFoundError(f"no local folder {path!r}, and it could not be fetched from the hub: {e}") from e


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, vocab)
    next_position: torch.Tensor | None = None  # (B,) MRoPE position of the first new token


@dataclass
class Prompt:
    """A prompt turned into decoder inputs (vision already encoded)."""

    embeds: torch.Tensor  # (B, T, H)
    positions: torch.Tensor  # (3, B, T)
    next_position: torch.Tensor  # (B,)
    visual_mask: torch.Tensor | None = None  # (B, T) bool
    deepstack: list = field(default_factory=list)  # per layer (n_visual, H)


class Qwen3VL(nn.Module):
    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.generation_config: dict = {}
        self.quantization: str | None = None
        self.model = nn.Module()
        self.model.visual = VisionEncoder(config.vision)
        self.model.language_model = TextDecoder(config.text)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.rope = TextRope(config.text.head_dim, config.text.rope_theta, config.text.mrope_section)
        self.tie_weights()

    # ----------------------------------------------------------------- construction
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def materialize(self, device) -> "Qwen3VL":
        """Allocate (uninitialised) storage for a meta-built model. The rotary tables are not
        buffers (see ``rope._Tables``), so nothing is left uninitialised but the weights."""
        self.to_empty(device=device)
        self.tie_weights()
        if torch.device(device).type == "cpu":
            from ..allocator import advise_huge_pages

            advise_huge_pages([*self.parameters(), *self.buffers()])  # before the weights are written
        return self

    @classmethod
    def from_config(cls, path_or_dict, device="meta", dtype=None) -> "Qwen3VL":
        """Architecture only. On the meta device nothing is allocated; on a real device the
        weights are random (normal, std 0.02), for demos and benchmarks."""
        config = path_or_dict if isinstance(path_or_dict, Qwen3VLConfig) else Qwen3VLConfig.from_pretrained(path_or_dict)
        dtype = resolve_dtype(dtype, config) if dtype is not None else torch.float32
        with torch.device("meta"):
            model = cls(config).to(dtype)
        if str(device) != "meta":
            model.materialize(device)
            model.init_random()
            model.select_kernels()
        return model.eval()

    def select_kernels(self) -> None:
        """Let bf16 CPU linears, decode attention and the pointwise passes of both towers use the
        compiled kernels (built now, at load, so the first request does not pay for it; see
        ``qwen3vl.kernels``)."""
        from .. import kernels
        from ..allocator import keep_heap

        if self.model.language_model.embed_tokens.weight.device.type == "cpu":
            keep_heap()  # activations reused instead of re-faulted (see qwen3vl.allocator)
        linears = [m for m in self.modules() if isinstance(m, Linear) and m.weight.dtype == torch.bfloat16
                   and m.weight.device.type == "cpu" and m.weight.is_contiguous()]
        moes = [m for m in self.modules() if isinstance(m, SparseMoE) and _multi_kernel_experts(m)]
        # Decode-step kernels for bf16 activations on CPU (the embeddings' dtype is the model's);
        # the attention kernel needs head_dim % 32 == 0 (all released models: 128).
        emb = self.model.language_model.embed_tokens.weight
        bf16_cpu = emb.dtype == torch.bfloat16 and emb.device.type == "cpu"
        steps = [m for m in self.modules() if bf16_cpu and (isinstance(m, MLP) or isinstance(m, Attention)
                                                            and m.hd % 32 == 0)]
        # Vision: the rotary pass (bf16 or fp32, bit-identical) and, in bf16, the tanh-GELU.
        pos = self.model.visual.pos_embed.weight
        vision = [m for m in self.model.visual.modules() if pos.device.type == "cpu" and (
            isinstance(m, VisionAttention) or isinstance(m, VisionMLP) and pos.dtype == torch.bfloat16)]
        if (linears or moes or steps or vision) and kernels.available():
            for m in linears:
                m.use_kernels = True
            for m in moes:
                m.multi_kernels = True
            for m in steps + vision:
                m.cpu_kernels = True
            self.model.language_model.enable_step_kernels()  # batch-1 decode: dense layers in one call

    @torch.no_grad()
    def init_random(self, std: float = 0.02, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1 and "norm" in name.rsplit(".", 2)[-2]:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto", device="cpu", progress: bool | None = None,
                        quantization: str | None = None, group_size: int = 64) -> "Qwen3VL":
        """Load a checkpoint folder (or hub id). ``quantization``: None, "int8" or "int4"
        (weight-only, done while loading; see ``qwen3vl.quant``)."""
        path = resolve_model_path(os.fspath(path))
        config = Qwen3VLConfig.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config).to(resolve_dtype(dtype, config))
        if quantization:
            from ..quant import quantize_modules

            quantize_modules(model, quantization, group_size)
        model.materialize(device)
        load_checkpoint(model, path, progress=progress)
        if quantization:
            from ..quant import finalize

            if config.tie_word_embeddings:  # the quantized lm_head gets its own copy of the table
                model.lm_head.load_weight(None, model.model.language_model.embed_tokens.weight)
            finalize(model)
        model.quantization = quantization
        model.select_kernels()
        gen = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen, encoding="utf-8") as f:
                model.generation_config = json.load(f)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    # ----------------------------------------------------------------- forward pieces
    def encode_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Run images and videos through the encoder in one call.
        -> (image feats, video feats, [deepstack image], [deepstack video]); feats (n, H)."""
        pix = [p for p in (pixel_values, pixel_values_videos) if p is not None]
        grids = [g for p, g in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)) if p is not None]
        if any(g is None for g in grids):
            raise ValueError("pixel_values / pixel_values_videos given without image_grid_thw / video_grid_thw")
        merged, deep = self.model.visual(torch.cat(pix), torch.cat(grids).to(torch.long))
        m2 = self.config.vision.spatial_merge_size ** 2
        n_img = int(image_grid_thw.prod(-1).sum()) // m2 if pixel_values is not None else 0
        return merged[:n_img], merged[n_img:], [d[:n_img] for d in deep], [d[n_img:] for d in deep]

    def _scatter(self, embeds, mask, feats, what: str) -> None:
        n_tok = int(mask.sum())
        if n_tok != feats.shape[0]:
            raise PlaceholderMismatch(
                f"{what} features and {what} tokens do not match: {n_tok} placeholder tokens in input_ids, "
                f"{feats.shape[0]} features from the {what} grids"
            )
        embeds[mask] = feats.to(embeds.dtype)

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None) -> Prompt:
        """Embed a prompt: token embeddings with vision features merged in, positions, deepstack."""
        cfg = self.config
        input_ids = input_ids.to(self.device)
        embeds = self.model.language_model.embed_tokens(input_ids)  # (B, T, H)
        img_mask, vid_mask = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        if pixel_values is None and bool(img_mask.any()):
            raise PlaceholderMismatch(f"input_ids has {int(img_mask.sum())} image tokens but no pixel_values")
        if pixel_values_videos is None and bool(vid_mask.any()):
            raise PlaceholderMismatch(f"input_ids has {int(vid_mask.sum())} video tokens but no pixel_values_videos")
        visual_mask, deepstack = None, []
        if pixel_values is not None or pixel_values_videos is not None:
            img, vid, ds_img, ds_vid = self.encode_vision(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
            if pixel_values is not None:
                self._scatter(embeds, img_mask, img, "image")
            if pixel_values_videos is not None:
                self._scatter(embeds, vid_mask, vid, "video")
            visual_mask = img_mask | vid_mask
            is_img = img_mask[visual_mask]  # (n_visual,) which visual tokens are image tokens
            for di, dv in zip(ds_img, ds_vid):
                joint = di.new_zeros(int(visual_mask.sum()), di.shape[-1])
                joint[is_img] = di
                joint[~is_img] = dv
                deepstack.append(joint)
        positions, next_position = mrope_positions(
            input_ids, attention_mask, image_grid_thw, video_grid_thw,
            cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size)
        return Prompt(embeds, positions, next_position, visual_mask, deepstack)

    def logits(self, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, logits_to_keep: int = 0, **unused) -> ModelOutput:
        """Full-sequence forward with reference semantics (no cache). Extra processor keys such as
        ``mm_token_type_ids`` are accepted and ignored: positions come from input_ids + grids."""
        p = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        cos, sin = self.rope(p.positions, p.embeds.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padded_causal_mask(attention_mask.to(self.device).bool())
        hidden = self.model.language_model(p.embeds, AttnContext(cos, sin, mask), p.visual_mask, p.deepstack)
        return ModelOutput(self.logits(hidden, logits_to_keep), p.next_position)


    def generate(self, input_ids, attention_mask=None, sampling_params=None, **kwargs) -> torch.Tensor:
        """Generate with reference semantics: -> (B, T + new) ids, finished rows padded with the
        pad id. Settings (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, penalties,
        seed, eos_token_id / stop_token_ids, min_new_tokens) default to generation_config.json.
        ``streamer``: as in transformers, ``put(ids)`` with the prompt, then each step's tokens."""
        from ..engine.generate import MODEL_INPUTS, generate, resolve_params

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update({k: kwargs.pop(k) for k in MODEL_INPUTS if k in kwargs})
        kwargs.pop("mm_token_type_ids", None)
        streamer = kwargs.pop("streamer", None)
        return generate(self, batch, resolve_params(self, sampling_params, **kwargs), streamer)

    def generate_stream(self, tokenizer, input_ids, attention_mask=None, sampling_params=None, **kwargs):
        """Like ``generate`` but yields text as it is produced: a str per step for one prompt, a
        list of str (one per row) for a batch. Pieces never split a UTF-8 character and
        concatenate to ``tokenizer.decode(new_ids, skip_special_tokens=True)``. ``tokenizer``: a
        ``Processor`` or its ``.tokenizer``."""
        from ..engine.generate import MODEL_INPUTS, resolve_params, stream_tokens
        from ..processor.tokenizer import IncrementalDetokenizer

        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update({k: kwargs.pop(k) for k in MODEL_INPUTS if k in kwargs})
        kwargs.pop("mm_token_type_ids", None)
        params = resolve_params(self, sampling_params, **kwargs)
        detoks = [IncrementalDetokenizer(tokenizer, skip_special_tokens=True) for _ in range(input_ids.shape[0])]
        done = [False] * len(detoks)
        for step in stream_tokens(self, batch, params):
            pieces = []
            for i, d in enumerate(detoks):
                piece = "" if done[i] else d.add(int(step.tokens[i]))
                if bool(step.finished[i]) and not done[i]:
                    piece += d.flush()
                    done[i] = True
                pieces.append(piece)
            yield pieces[0] if len(pieces) == 1 else pieces


def _multi_kernel_experts(moe: SparseMoE) -> bool:
    """Whether the compiled kernels can run this block's experts: bf16 CPU stacks, or quantized
    experts that use the compiled kernels (``qwen3vl.quant``)."""
    if isinstance(moe.gate_up_proj, torch.Tensor):
        return all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and p.is_contiguous()
                   for p in (moe.gate_up_proj, moe.down_proj))
    return bool(getattr(moe.gate_up_proj, "ext_kernels", False))


def padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: (B, T) bool -> (B, 1, T, T) bool: causal, padded keys hidden. A padded query
    attends to itself only, so no row is empty (an empty row gives NaN in SDPA)."""
    t = valid.shape[1]
    idx = torch.arange(t, device=valid.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T)
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return mask[:, None]
