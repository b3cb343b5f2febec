"""``qwen3vl.Qwen3VL``: the model with Hugging Face-style generation on top.

    model = qwen3vl.Qwen3VL.from_pretrained(path)
    ids = model.generate(**batch, max_new_tokens=64, do_sample=False)   # (B, T + new)

The network and its loaders are ``qwen3vl.model.Qwen3VLModel`` (a layer below: it knows nothing of
generation); ``generate`` runs the engine's lock-step loop (``qwen3vl.engine.generate``).
"""
from __future__ import annotations

from ..model.qwen3vl import Qwen3VLModel
from ..processor.tokenizer import IncrementalDetokenizer
from .generate import MODEL_INPUTS, generate, resolve_params, stream_tokens


def _batch(input_ids, attention_mask, kwargs: dict) -> dict:
    """The model inputs among ``generate``'s keyword arguments (taken out of ``kwargs``)."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch.update({k: kwargs.pop(k) for k in MODEL_INPUTS if k in kwargs})
    kwargs.pop("mm_token_type_ids", None)  # positions come from input_ids + grids
    return batch


class Qwen3VL(Qwen3VLModel):
    def generate(self, input_ids, attention_mask=None, sampling_params=None, **kwargs):
        """Generate with reference semantics: -> (B, T + new) ids, finished rows padded with the
        pad id. Settings (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, penalties,
        seed, eos_token_id / stop_token_ids, min_new_tokens) default to generation_config.json.
        ``streamer``: as in transformers, ``put(ids)`` with the prompt, then each step's tokens."""
        batch = _batch(input_ids, attention_mask, kwargs)
        streamer = kwargs.pop("streamer", None)
        return generate(self, batch, resolve_params(self, sampling_params, **kwargs), streamer)

    def generate_stream(self, tokenizer, input_ids, attention_mask=None, sampling_params=None, **kwargs):
        """Like ``generate`` but yields text as it is produced: a str per step for one prompt, a
        list of str (one per row) for a batch. Pieces never split a UTF-8 character and
        concatenate to ``tokenizer.decode(new_ids, skip_special_tokens=True)``. ``tokenizer``: a
        ``Processor`` or its ``.tokenizer``."""
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        batch = _batch(input_ids, attention_mask, kwargs)
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
