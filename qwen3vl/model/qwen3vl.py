"""The Qwen3-VL model: vision encoder + text decoder + lm_head, with the loaders
(``from_pretrained``, ``from_config``), the reference-semantics ``model(**batch).logits`` and the
one forward ``step`` (embeddings + positions + a cache view -> logits) that every caller shares.

Module names mirror the released checkpoint (``model.visual``, ``model.language_model``,
``lm_head``) so the name table in ``weights.py`` stays a near-identity.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels, quant
from ..allocator import advise_huge_pages, keep_heap
from ..config import Qwen3VLConfig
from ..weights import load_checkpoint
from .cache_view import CacheView, Uncached
from .positions import PlaceholderMismatch, mrope_positions
from .rope import TextRope
from .text import AttnContext, Linear, TextDecoder
from .vision import VisionEncoder
from .weight_cache import enabled as weight_cache_enabled
from .weight_cache import load as load_mapped

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


def looks_like_path(path: str) -> bool:
    """A local path rather than a hub id: absolute, ./ ../ ~ (or the OS's separators), or one whose
    parent folder exists."""
    starts = ("/", "./", "../", "~", ".\\", "..\\")
    parent = os.path.dirname(path)
    return (os.path.isabs(path) or path.startswith(starts) or path in (".", "..")
            or (bool(parent) and os.path.isdir(os.path.expanduser(parent))))


def resolve_model_path(path: str) -> str:
    """A local folder, or a hub id resolved through the local Hugging Face cache
    (downloading only when the network allows)."""
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if os.path.exists(os.path.expanduser(path)):
        raise FileNotFoundError(f"{path} is a file; expected a checkpoint folder")
    if looks_like_path(path):
        raise FileNotFoundError(f"no such folder: {path}")
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


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
_init_lock = threading.Lock()


@contextlib.contextmanager
def skip_init():
    """Parameter initialisers as no-ops while a model is built on the meta device: there they
    compute nothing, but ``nn.Embedding``'s ``normal_`` on a meta tensor runs through
    ``torch._refs``, whose first call imports ``torch._dynamo`` (~2 s of every start)."""
    with _init_lock:
        saved = {n: getattr(nn.init, n) for n in _INITS}
        for n, f in saved.items():
            setattr(nn.init, n, lambda t, *a, _f=f, **k: t if t.device.type == "meta" else _f(t, *a, **k))
        try:
            yield
        finally:
            for n, f in saved.items():
                setattr(nn.init, n, f)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T or logits_to_keep, vocab)
    next_position: torch.Tensor | None = None  # (B,) MRoPE position of the first new token
    loss: torch.Tensor | None = None  # () with ``labels``


@dataclass
class Prompt:
    """A prompt turned into decoder inputs (vision already encoded)."""

    embeds: torch.Tensor  # (B, T, H)
    positions: torch.Tensor  # (3, B, T)
    next_position: torch.Tensor  # (B,)
    visual_mask: torch.Tensor | None = None  # (B, T) bool
    deepstack: list = field(default_factory=list)  # per layer (n_visual, H)


class Qwen3VLModel(nn.Module):
    """The network (vision encoder, text decoder, lm_head) and its loaders. Generation lives a
    layer up (``qwen3vl.engine.hf.Qwen3VL`` adds ``generate``). ``mapped``: see ``promote``."""
    mapped = None  # a mapped load's model.promote.Promoter

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        self.config = config
        self.generation_config: dict = {}
        self.quantization: str | None = None
        self.model = nn.Module()
        self.model.visual = VisionEncoder(config.vision)
        self.model.language_model = TextDecoder(config.text)
        self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.rope = TextRope(config.text.head_dim, config.text.rope_theta, config.text.mrope_section,
                             config.text.rope_scaling)
        self.tie_weights()

    # ----------------------------------------------------------------- construction
    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def materialize(self, device) -> "Qwen3VLModel":
        """Allocate (uninitialised) storage for a meta-built model. The rotary tables are not
        buffers (see ``rope._Tables``), so nothing is left uninitialised but the weights."""
        self.to_empty(device=device)
        self.tie_weights()
        if torch.device(device).type == "cpu":
            advise_huge_pages([*self.parameters(), *self.buffers()])  # before the weights are written
        return self

    @classmethod
    def from_config(cls, path_or_dict, device="meta", dtype=None) -> "Qwen3VLModel":
        """Architecture only. On the meta device nothing is allocated; on a real device the
        weights are random (normal, std 0.02), for demos and benchmarks."""
        config = path_or_dict if isinstance(path_or_dict, Qwen3VLConfig) else Qwen3VLConfig.from_pretrained(path_or_dict)
        dtype = resolve_dtype(dtype, config) if dtype is not None else torch.float32
        with torch.device("meta"), skip_init():
            model = cls(config).to(dtype)
        if str(device) != "meta":
            model.materialize(device)
            model.init_random()
            model.select_kernels()
        return model.eval()

    def select_kernels(self, compiled: bool = True) -> kernels.Ops:
        """Build the compiled CPU kernels now (at load, so the first request does not pay for it)
        and hand every module the ops chosen for the model's dtype and device
        (``qwen3vl.kernels.select``; ``compiled=False``: the reference ops, for comparisons). Decode
        then runs dense layers in one call where every part runs on the kernels. Call again after
        converting or moving the model (that returns its modules to the reference ops)."""
        if self.device.type == "cpu":
            keep_heap()  # activations reused instead of re-faulted (see qwen3vl.allocator)
            kernels.build()
        ops = kernels.select(self.dtype, self.device) if compiled else kernels.REFERENCE
        for m in self.modules():
            if isinstance(m, kernels.HoldsOps):
                m.use_ops(ops)
        self.model.language_model.enable_step_kernels()  # batch-1 decode: dense layers in one call
        return ops

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
                        quantization: str | None = None, group_size: int = 64,
                        weight_cache: bool | None = None, rope_scaling: dict | str | None = None) -> "Qwen3VLModel":
        """Load a checkpoint folder (or hub id). ``quantization``: None, "int8" or "int4"
        (weight-only, done while loading; see ``qwen3vl.quant``). On the CPU the weights are
        memory-mapped: in place where the checkpoint's layout is the runtime one (all of it when
        ``dtype`` is the checkpoint's, unquantized: q/k/v and gate/up split, ``split_linear``), the
        rest converted once into ``$QWEN3VL_HOME/weights`` (``qwen3vl.model.weight_cache``);
        ``weight_cache=False`` (or ``QWEN3VL_NO_WEIGHT_CACHE=1``) copies them into memory instead."""
        quant.check_device(quantization, device)  # "fp8" (keep an FP8 checkpoint's weights): CUDA only
        path = resolve_model_path(os.fspath(path))
        # rope_scaling: replaces config.json's text rotary scaling (YaRN, Qwen3VLConfig.with_rope_scaling)
        config = Qwen3VLConfig.from_pretrained(path).with_rope_scaling(rope_scaling)
        dtype = resolve_dtype(dtype, config)

        def make_model() -> "Qwen3VLModel":
            with torch.device("meta"), skip_init():
                model = cls(config).to(dtype)
            if quantization:
                quant.quantize_modules(model, quantization, group_size)
            return model

        def after_load(model: "Qwen3VLModel") -> None:
            if quantization in quant.QUANT_MODES and config.tie_word_embeddings:  # the quantized lm_head gets its own copy of the table
                model.lm_head.load_weight(None, model.model.language_model.embed_tokens.weight)

        if torch.device(device).type == "cpu":
            keep_heap()  # before loading: its slice-sized temporaries are then reused, not re-faulted
        mapped = weight_cache_enabled(weight_cache, device)
        model = load_mapped(make_model, path, dtype, quantization, group_size, progress, after_load) if mapped else None
        if model is None:
            model = make_model().materialize(device)
            load_checkpoint(model, path, progress=progress)
            after_load(model)
        return model.finish_loading(path, quantization)

    def finish_loading(self, path: str, quantization: str | None) -> "Qwen3VLModel":
        """After the weights are in: the quantized layers' kernels, the ops, the checkpoint's
        generation config, eval mode."""
        if quantization:
            quant.finalize(self)  # builds the compiled kernels: the decode path depends on them
        self.quantization = quantization
        self.select_kernels()
        gen = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen, encoding="utf-8") as f:
                self.generation_config = json.load(f)
        return self.eval()

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

    def encode_items(self, pixels: list[torch.Tensor], grids: list[torch.Tensor]) -> list[tuple]:
        """Several images / videos (pixel rows (N_i, C*T*P*P), grid (3,) each) through the encoder
        in one call -> per item (merged features (n_i, H), [DeepStack features (n_i, H)] per layer)."""
        grid = torch.stack([g.reshape(3) for g in grids]).to(torch.long)  # (items, 3)
        merged, deep = self.model.visual(torch.cat(pixels), grid)
        sizes = (grid.prod(-1) // self.config.vision.spatial_merge_size ** 2).tolist()
        per_layer = [d.split(sizes) for d in deep]
        return [(m, [d[i] for d in per_layer]) for i, m in enumerate(merged.split(sizes))]

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
        input_ids = input_ids.to(self.device)
        image = video = None
        if pixel_values is not None or pixel_values_videos is not None:
            img, vid, ds_img, ds_vid = self.encode_vision(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
            image = (img, ds_img) if pixel_values is not None else None
            video = (vid, ds_vid) if pixel_values_videos is not None else None
        embeds, visual_mask, deepstack = self.embed(input_ids, image, video)
        positions, next_position = self.positions(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        return Prompt(embeds, positions, next_position, visual_mask, deepstack)

    def embed(self, input_ids: torch.Tensor, image: tuple | None = None, video: tuple | None = None):
        """Token embeddings of input_ids (B, T) with the vision features of its image / video
        placeholder tokens merged in. ``image``, ``video``: (features (n, H), [DeepStack (n, H)] per
        layer) of exactly those tokens, in order (None: there are none).
        -> (embeds (B, T, H), visual_mask (B, T) bool or None, [DeepStack (n_visual, H)] per layer)."""
        cfg = self.config
        input_ids = input_ids.to(self.device)
        embeds = self.model.language_model.embed_tokens(input_ids)  # (B, T, H)
        img_mask, vid_mask = input_ids == cfg.image_token_id, input_ids == cfg.video_token_id
        if image is None and bool(img_mask.any()):
            raise PlaceholderMismatch(f"input_ids has {int(img_mask.sum())} image tokens but no pixel_values")
        if video is None and bool(vid_mask.any()):
            raise PlaceholderMismatch(f"input_ids has {int(vid_mask.sum())} video tokens but no pixel_values_videos")
        if image is None and video is None:
            return embeds, None, []
        for feats, mask, what in ((image, img_mask, "image"), (video, vid_mask, "video")):
            if feats is not None:
                self._scatter(embeds, mask, feats[0], what)
        visual_mask = img_mask | vid_mask
        is_img = img_mask[visual_mask]  # (n_visual,) which visual tokens are image tokens
        deepstack = []
        for i in range(len((image or video)[1])):
            joint = embeds.new_zeros(int(visual_mask.sum()), embeds.shape[-1])  # (n_visual, H)
            if image is not None:
                joint[is_img] = image[1][i].to(joint.dtype)
            if video is not None:
                joint[~is_img] = video[1][i].to(joint.dtype)
            deepstack.append(joint)
        return embeds, visual_mask, deepstack

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        """MRoPE positions of a prompt: input_ids (B, T) -> (positions (3, B, T), next_position (B,))."""
        cfg = self.config
        return mrope_positions(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                               cfg.image_token_id, cfg.video_token_id, cfg.vision.spatial_merge_size)

    def logits(self, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, view: CacheView, visual_mask=None,
             deepstack=(), logits_to_keep: int = 0) -> torch.Tensor:
        """The one forward step every caller shares (``forward``, generation, the serving runner,
        CUDA-graph capture): input embeddings (B, T, H) at MRoPE positions (3, B, T) through the
        decoder, keys and values going through the cache view ``view`` -> logits (B, T, V), or the
        last ``logits_to_keep`` positions' (B, n, V). ``visual_mask`` (B, T) bool and ``deepstack``
        (per layer (n_visual, H)): where the DeepStack features are added (prefill only)."""
        cos, sin = self.rope(positions, embeds.dtype)  # (B, T, D) each
        return self._run(embeds, cos, sin, view, visual_mask, deepstack, logits_to_keep)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, view: CacheView) -> torch.Tensor:
        """``step`` for one new text token per row (its three MRoPE rows are equal): tokens,
        positions (B,) long -> logits (B, V) float32."""
        embeds = self.model.language_model.embed_tokens(tokens[:, None])  # (B, 1, H)
        cos, sin = self.rope.text(positions[:, None], embeds.dtype)  # (B, 1, D) each
        return self._run(embeds, cos, sin, view)[:, -1].float()

    def _run(self, embeds, cos, sin, view: CacheView, visual_mask=None, deepstack=(), logits_to_keep: int = 0):
        hidden = self.model.language_model(embeds, AttnContext(cos, sin, view), visual_mask, deepstack)
        return self.logits(hidden, logits_to_keep)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, logits_to_keep: int = 0, labels=None,
                num_items_in_batch=None, **unused) -> ModelOutput:
        """Full-sequence forward with reference semantics (no cache). Extra processor keys such as
        ``mm_token_type_ids`` are accepted and ignored: positions come from input_ids + grids.
        ``labels`` (B, T), -100 where ignored: ``.loss`` is the reference's shifted cross-entropy
        (mean over counted tokens, or their sum / ``num_items_in_batch``). When ``records_grad()``
        the call is recorded for autograd (the modules then run the reference ops, see
        ``kernels.ops``); otherwise it runs under ``inference_mode`` on the load-time kernels."""
        args = (input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                logits_to_keep, labels, num_items_in_batch)
        if self.records_grad():
            return self._forward(*args)
        with torch.inference_mode():
            return self._forward(*args)

    def records_grad(self) -> bool:
        """Whether ``forward`` is recorded for autograd: grad mode on and a trainable parameter
        (not for weight-quantized models, whose integer weights do not train)."""
        return (torch.is_grad_enabled() and not self.quantization
                and any(p.requires_grad and not p.is_inference() for p in self.parameters()))

    def _forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                 logits_to_keep, labels, num_items_in_batch) -> ModelOutput:
        p = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        valid = None if attention_mask is None else attention_mask.to(self.device).bool()
        logits = self.step(p.embeds, p.positions, Uncached(valid), p.visual_mask, p.deepstack, logits_to_keep)
        loss = None if labels is None else causal_lm_loss(logits, labels, num_items_in_batch)
        return ModelOutput(logits, p.next_position, loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Tokens < n predict n: cross-entropy in float32 of logits (B, T', V) against labels (B, T)
    shifted left by one (the last position predicts nothing), ``ignore_index`` skipped; the mean
    over counted tokens, or the sum divided by ``num_items_in_batch`` when given. With
    ``logits_to_keep`` the logits cover the last T' positions and are matched to the labels
    shifted and padded the same way (the reference's reduction)."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' (B, T) "
                         f"{tuple(logits.shape[:2])}: with logits_to_keep, pass labels for the kept positions")
    target = nn.functional.pad(labels.to(logits.device), (0, 1), value=ignore_index)[..., 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index)
    total = nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)
