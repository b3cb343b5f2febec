"""``Processor``: messages (or text + media) -> model inputs, and token ids -> text.

Output keys match the reference processor: ``input_ids``, ``attention_mask``,
``mm_token_type_ids`` (0 text, 1 image, 2 video), ``pixel_values`` + ``image_grid_thw`` when
there are images, ``pixel_values_videos`` + ``video_grid_thw`` when there are videos.
Per-video sampling metadata is on ``batch.video_metadata`` (also a key with ``return_metadata``).
"""
from __future__ import annotations

import json
import os
import re
import time

import torch

from . import chat
from .chat import MediaItem
from .components import ImageProcessor, VideoProcessor
from .errors import ImageSizeError, MediaLimitError
from .image import VisionParams, image_rows, resize_for_model
from .limits import MediaLimits
from .media import load_image, load_video
from .options import CALL_OPTIONS, check_media_options
from .tokenizer import Tokenizer
from .video import VideoParams, preprocess_video, sample_indices, target_video_size, video_placeholder
from .video_inputs import apply_metadata

# Vision tokens: the tokenizer config's (image_token, ...), else these, Qwen3-VL's; ids come from the tokenizer.
DEFAULT_VISION_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


class BatchFeature(dict):
    """A dict of model inputs that also allows attribute access (``batch.input_ids``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device=None, dtype=None) -> "BatchFeature":
        """Move tensors to ``device``; ``dtype`` (also ``.to(torch.bfloat16)``) applies to floating tensors only."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        out = BatchFeature({k: _move(v, device, dtype) for k, v in self.items()})
        out.__dict__.update(self.__dict__)
        return out


def _move(value, device, dtype):
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Processor:
    """Qwen3-VL input processor (images, videos, tokenizer, chat template)."""

    def __init__(self, tokenizer: Tokenizer, image_params: VisionParams | None = None,
                 video_params: VideoParams | None = None, chat_template: str | None = None,
                 limits: MediaLimits | None = None, use_fast: bool = True):
        self.tokenizer = tokenizer
        self.limits = limits or MediaLimits()  # what one call may fetch / decode / keep
        self.image_processor = ImageProcessor(image_params or VisionParams(), use_fast)
        self.video_processor = VideoProcessor(video_params or VideoParams(VisionParams(min_pixels=4096,
                                                                                       max_pixels=25165824)))
        self.chat_template = chat_template
        tokens = [tokenizer.special_token(name, default) for name, default in DEFAULT_VISION_TOKENS.items()]
        self.image_token, self.video_token, self.vision_start_token, self.vision_end_token = tokens
        ids = tokenizer.convert_tokens_to_ids(tokens)
        missing = [t for t, i in zip(tokens, ids) if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no token {missing[0]!r}")
        self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id = ids
        self._placeholder = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")

    @property
    def image_params(self) -> VisionParams:
        """The image settings now (``image_processor``'s attributes, which users may set)."""
        return self.image_processor.params()

    @property
    def video_params(self) -> VideoParams:
        return self.video_processor.video_params()

    @classmethod
    def from_pretrained(cls, path: str, limits: MediaLimits | None = None, use_fast: bool | None = None,
                        **overrides) -> "Processor":
        """Build from a local checkpoint folder (preprocessor/video configs, tokenizer, template).
        ``use_fast=False``: images resized and normalised as transformers' PIL backend does."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"not a local model folder: {path}")
        image_cfg = {**_read_json(os.path.join(path, "preprocessor_config.json")), **overrides}
        video_cfg = _read_json(os.path.join(path, "video_preprocessor_config.json")) or image_cfg
        return cls(Tokenizer.from_pretrained(path), VisionParams.from_config(image_cfg),
                   VideoParams.from_config(video_cfg), chat.load_chat_template(path), limits,
                   use_fast is not False)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens,
                                           clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "pt", padding: bool = True,
                            padding_side: str | None = None, tools=None, documents=None,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            return_mm_token_type_ids: bool = True, return_metadata: bool = False, **kwargs):
        """One conversation or a list of them -> prompt text(s), or model inputs when ``tokenize``.

        Defaults are transformers': the prompt string; ``tokenize=True`` gives ``input_ids``,
        ``tokenize=True, return_dict=True`` the full model inputs.

        Keywords in ``CALL_OPTIONS`` set the pixel budget / video sampling for this call; every
        other keyword (``add_vision_id``, ``enable_thinking``...) is passed to the template.
        """
        batched = chat.is_batched(conversation)
        conversations = [chat.normalize_conversation(c) for c in (conversation if batched else [conversation])]
        options = {k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs}
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this checkpoint has no chat template; pass chat_template=")
        special = {"eos_token": self.tokenizer.eos_token, "pad_token": self.tokenizer.pad_token,
                   "bos_token": self.tokenizer.bos_token, "unk_token": self.tokenizer.unk_token}
        prompts = []
        for messages in conversations:
            kw = dict(add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                      special_tokens=special, **kwargs)
            if continue_final_message:  # True: continue the content; a field name: continue that field
                field = continue_final_message if isinstance(continue_final_message, str) else "content"
                text = chat.render_continuing(template, messages, field, **kw)
            else:
                text = chat.render(template, messages, **kw)
            prompts.append(text)
        if not tokenize:
            return prompts if batched else prompts[0]
        media = [chat.extract_media(m) for m in conversations]
        out = self._encode(prompts, [i for items in media for i in items if i.kind == "image"],
                           [i for items in media for i in items if i.kind == "video"], options,
                           return_tensors=return_tensors, padding=padding, padding_side=padding_side,
                           return_mm_token_type_ids=return_mm_token_type_ids, return_metadata=return_metadata)
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ text + media
    def __call__(self, text=None, images=None, videos=None, *, return_tensors: str | None = "pt",
                 padding: bool | str = True, padding_side: str | None = None, return_mm_token_type_ids: bool = True,
                 return_metadata: bool = False, video_metadata=None, do_resize: bool | None = None,
                 do_sample_frames: bool | None = None, **options) -> BatchFeature:
        """Prompt text(s) containing ``<|image_pad|>`` / ``<|video_pad|>`` placeholders + the media.

        ``images``: one image, a flat list, or one list per text. ``videos``: one video (path, URL,
        list of frames or array), a list of them, or one list per text. Media are matched to
        placeholders in order. Options: ``min_pixels``, ``max_pixels``, ``fps`` (a list: one per
        video), ``num_frames``, ``total_pixels``; ``video_metadata`` (one per video), ``do_resize``,
        ``do_sample_frames`` as in the reference (the qwen-vl-utils flow passes ``do_resize=False``).
        """
        for group in ("images_kwargs", "videos_kwargs", "text_kwargs", "common_kwargs"):
            options.update(options.pop(group, None) or {})
        unknown = set(options) - set(CALL_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
        texts = [text] if isinstance(text, str) else list(text or [])
        image_items = [MediaItem("image", s) for s in _flatten_media(images, is_video=False)]
        video_items = [MediaItem("video", s) for s in _flatten_media(videos, is_video=True)]
        if video_metadata is not None:
            video_metadata = [video_metadata] if isinstance(video_metadata, dict) or not isinstance(
                video_metadata, (list, tuple)) else list(video_metadata)
            if len(video_metadata) != len(video_items):
                raise ValueError(f"{len(video_metadata)} video_metadata entries for {len(video_items)} videos")
        options.update(video_metadata=video_metadata, do_resize=do_resize, do_sample_frames=do_sample_frames)
        return self._encode(texts, image_items, video_items, options, return_tensors=return_tensors,
                            padding=padding, padding_side=padding_side,
                            return_mm_token_type_ids=return_mm_token_type_ids, return_metadata=return_metadata)

    def _encode(self, texts: list[str], image_items: list[MediaItem], video_items: list[MediaItem],
                options: dict, *, return_tensors, padding, padding_side, return_mm_token_type_ids,
                return_metadata) -> BatchFeature:
        if return_tensors not in (None, "pt", "torch", "np", "numpy"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt', 'np' or None)")
        deadline = time.monotonic() + self.limits.request_deadline_s  # all media of this call, fetch and decode
        self._check_counts(image_items, video_items)
        data: dict = {}
        image_tokens, video_texts, metadata = [], [], []
        if image_items:
            pixel_values, grids = self._process_images(image_items, options, deadline)
            data["pixel_values"], data["image_grid_thw"] = pixel_values, grids
            merge = self.image_processor.merge_size ** 2
            image_tokens = [int(g.prod()) // merge for g in grids]
        if video_items:
            params = self.video_params
            videos = self._process_videos(video_items, options, params, deadline)
            rows = [v.pixel_values for v in videos]
            data["pixel_values_videos"] = rows[0] if len(rows) == 1 else torch.cat(rows, 0)  # (sum N, 1536)
            data["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos], dtype=torch.int64)
            video_texts = [video_placeholder(v, params, self.video_token, self.vision_start_token,
                                             self.vision_end_token) for v in videos]
            metadata = [{"frames_indices": v.indices, "timestamps": v.timestamps, "fps": v.fps,
                         "total_num_frames": v.total_frames} for v in videos]
        texts = self._expand_placeholders(texts, image_tokens, video_texts)
        ids = self.tokenizer.encode_batch(texts)
        data = {**self._pad(ids, padding, padding_side, return_mm_token_type_ids), **data}
        if return_tensors is None:
            data = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        elif return_tensors in ("np", "numpy"):
            data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        if return_metadata and metadata:
            data["video_metadata"] = metadata
        out = BatchFeature(data)
        out.__dict__["video_metadata"] = metadata
        return out

    def _check_counts(self, image_items: list[MediaItem], video_items: list[MediaItem]) -> None:
        for kind, items, most in (("image", image_items, self.limits.max_images),
                                  ("video", video_items, self.limits.max_videos)):
            if most is not None and len(items) > most:
                raise MediaLimitError(f"{len(items)} {kind}s in one call, over max_{kind}s={most}", kind=kind,
                                      index=most, source=items[most].source)

    def _process_images(self, items: list[MediaItem], options: dict, deadline: float):
        params = self.image_params
        do_resize = self.image_processor.do_resize if options.get("do_resize") is None else options["do_resize"]
        pil = not self.image_processor.use_fast
        images, grids = [], []
        for i, item in enumerate(items):
            size = {k: v for k, v in options.items() if k in ("min_pixels", "max_pixels") and v is not None}
            size.update(item.options)
            check_media_options({**size, "timeout": options.get("timeout")}, self.limits, kind="image", index=i,
                                source=item.source)
            image = load_image(item.source, index=i, timeout=options.get("timeout"), limits=self.limits,
                               deadline=deadline)
            pixels, grid = resize_for_model(image, params, index=i, do_resize=bool(do_resize), pil=pil,
                                            item_options=bool(item.options), **size)
            del image
            images.append(pixels)
            grids.append(grid)
        # All rows written straight into one tensor: no per-image copies to concatenate.
        sizes = [t * h * w for t, h, w in grids]
        pixel_values = torch.empty((sum(sizes), 3 * params.temporal_patch_size * params.patch_size ** 2))
        for pixels, rows in zip(images, pixel_values.split(sizes)):  # (sum N, 1536) float32
            image_rows(pixels, params, pil=pil, out=rows)
        return pixel_values, torch.tensor(grids, dtype=torch.int64)

    def _video_options(self, options: dict, item: MediaItem, j: int, params: VideoParams) -> dict:
        """One video's options: the call's, then the item's own (checked against the limits)."""
        opts = {k: v for k, v in options.items()
                if k in ("fps", "num_frames", "total_pixels", "timeout") and v is not None}
        if isinstance(opts.get("fps"), (list, tuple)):  # qwen-vl-utils: the sample fps of each video
            fps_list = opts.pop("fps")
            if j < len(fps_list):
                opts["sample_fps"] = fps_list[j]
        opts.update(item.options)
        check_media_options(opts, self.limits, kind="video", index=j, source=item.source)
        if "num_frames" in item.options:
            opts.pop("fps", None)  # an item's own num_frames wins over a call-level fps
        elif "fps" in item.options:
            opts.pop("num_frames", None)
        if opts.get("fps") is None and opts.get("num_frames") is None:
            opts["num_frames"] = self.video_processor.num_frames
        if opts.get("num_frames") is not None:  # an explicit count keeps at most max_frames frames too
            opts["num_frames"] = min(opts["num_frames"], self.limits.max_frames)
        opts["sample_fps"] = float(opts.get("sample_fps") or opts.get("fps") or params.fps)
        return opts

    def _process_videos(self, items: list[MediaItem], options: dict, params: VideoParams, deadline: float):
        out = []
        all_metadata = options.get("video_metadata") or [None] * len(items)
        do_resize = self.video_processor.do_resize if options.get("do_resize") is None else options["do_resize"]
        for j, item in enumerate(items):
            opts = self._video_options(options, item, j, params)
            fps, num_frames = opts.pop("fps", None), opts.pop("num_frames", None)
            sample_fps, timeout = opts.pop("sample_fps"), opts.pop("timeout", None)

            def sampler(total, video_fps, fps=fps, num_frames=num_frames):
                return sample_indices(total, video_fps, params, fps=fps, num_frames=num_frames)

            def frame_size(t, h, w, j=j, opts=opts, source=item.source):  # decoded frames go straight to it
                try:
                    th, tw = target_video_size(t, h, w, params, **opts)
                except ImageSizeError as exc:
                    raise ImageSizeError(exc.reason, kind="video", index=j) from None
                if t * th * tw > self.limits.max_total_pixels:  # refused before a frame is kept
                    raise MediaLimitError(f"{t} frames of {tw}x{th} ({t * th * tw} pixels) are over "
                                          f"{self.limits.total_pixels_name}={self.limits.max_total_pixels}",
                                          kind="video", index=j, source=source)
                return th, tw

            # frames that metadata re-samples afterwards are resized by preprocess_video, at their final count
            resampled = all_metadata[j] is not None and not isinstance(item.source, (str, os.PathLike))
            clip = load_video(item.source, sampler, index=j, sample_fps=sample_fps, timeout=timeout, limits=self.limits,
                              deadline=deadline, frame_size=frame_size if do_resize and not resampled else None)
            if resampled:
                sample = options.get("do_sample_frames")
                sample = self.video_processor.do_sample_frames if sample is None else sample
                clip = apply_metadata(clip, all_metadata[j], params, index=j, sample=bool(sample), fps=fps,
                                      num_frames=num_frames)
            out.append(preprocess_video(clip, params, index=j, do_resize=bool(do_resize), **opts))
        return out

    def _expand_placeholders(self, texts: list[str], image_tokens: list[int], video_texts: list[str]):
        """Replace the i-th ``<|image_pad|>`` by its n pads and the j-th ``<|video_pad|>`` by its slices."""
        n_img = sum(t.count(self.image_token) for t in texts)
        n_vid = sum(t.count(self.video_token) for t in texts)
        if n_img != len(image_tokens) or n_vid != len(video_texts):
            raise ValueError(f"the prompt has {n_img} image and {n_vid} video placeholders but "
                             f"{len(image_tokens)} images and {len(video_texts)} videos were given")
        images, videos = iter(image_tokens), iter(video_texts)
        out = []
        for text in texts:
            parts = self._placeholder.split(text)
            for k in range(1, len(parts), 2):
                parts[k] = self.image_token * next(images) if parts[k] == self.image_token else next(videos)
            out.append("".join(parts))
        return out

    def _pad(self, ids: list[list[int]], padding, padding_side, return_mm_token_type_ids) -> dict:
        side = padding_side or self.tokenizer.padding_side or "left"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max((len(x) for x in ids), default=0)
        if not padding and any(len(x) != longest for x in ids):
            raise ValueError("sequences have different lengths; pass padding=True")
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.int64)  # (B, T)
        mask = torch.zeros((len(ids), longest), dtype=torch.int64)               # (B, T)
        for b, seq in enumerate(ids):
            span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
            input_ids[b, span] = torch.tensor(seq, dtype=torch.int64)
            mask[b, span] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if return_mm_token_type_ids:
            types = torch.zeros_like(input_ids)
            types[input_ids == self.image_token_id] = 1
            types[input_ids == self.video_token_id] = 2
            out["mm_token_type_ids"] = types * mask
        return out


def _flatten_media(media, *, is_video: bool) -> list:
    """None, one item, a flat list, or one list per text -> flat list of items.

    For videos a list of frames (images, 3-D arrays, image paths) is ONE video.
    """
    if media is None:
        return []
    if not isinstance(media, (list, tuple)):
        return [media]
    if not is_video:
        return [m for sub in media for m in (sub if isinstance(sub, (list, tuple)) else [sub])]
    if media and all(_is_frame(m) for m in media):
        return [list(media)]
    out = []
    for m in media:
        if isinstance(m, (list, tuple)) and m and not all(_is_frame(f) for f in m):
            out.extend(m)  # one list of videos per text
        else:
            out.append(m)
    return out


_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _is_frame(x) -> bool:
    if isinstance(x, str):
        return x.lower().endswith(_IMAGE_EXTS) or x.startswith("data:image/")
    ndim = getattr(x, "ndim", None)
    return ndim == 3 or (ndim is None and hasattr(x, "getbands"))  # 3-D array or PIL image


