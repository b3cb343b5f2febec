"""``qwen3vl.Qwen3VL``: the model with Hugging Face-style generation on top.

    model = qwen3vl.Qwen3VL.from_pretrained(path)
    ids = model.generate(**batch, max_new_tokens=64, do_sample=False)   # (B, T + new)

The network and its loaders are ``qwen3vl.model.Qwen3VLModel`` (a layer below: it knows nothing of
generation); ``generate`` runs the engine's lock-step loop (``qwen3vl.engine.generate``).
"""
from __future__ import annotations

from ..model.qwen3vl import Qwen3VLModel
from ..processor.tokenizer import IncrementalDetokenizer
from .generate import MODEL_INPUTS, generate, pad_id, resolve_params, stream_tokens
from .outputs import GenerateOptions, GenerateOutput, ScoreRecorder


def _batch(input_ids, attention_mask, kwargs: dict) -> dict:
    """The model inputs among ``generate``'s keyword arguments (taken out of ``kwargs``)."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch.update({k: kwargs.pop(k) for k in MODEL_INPUTS if k in kwargs})
    kwargs.pop("mm_token_type_ids", None)  # positions come from input_ids + grids
    return batch


def _has_stop_strings(params) -> bool:
    return any(p.stop for p in (params if isinstance(params, list) else [params]))


class Qwen3VL(Qwen3VLModel):
    def generate(self, input_ids, attention_mask=None, sampling_params=None, **kwargs):
        """Generate with reference semantics: -> (B, T + new) ids, finished rows padded with the
        pad id. Settings (max_new_tokens, do_sample, temperature, top_k, top_p, min_p, penalties,
        seed, eos_token_id / stop_token_ids, min_new_tokens) default to generation_config.json,
        updated by ``generation_config`` (dict or GenerationConfig-like; explicit keywords win).
        Left-, right- or otherwise-padded batches give each row what it gives alone.
        ``streamer``: as in transformers, ``put(ids)`` with the prompt, then each step's tokens.
        transformers options (``qwen3vl.engine.outputs``): ``return_dict_in_generate`` with
        ``output_scores`` / ``output_logits`` -> ``GenerateOutput(sequences, scores, logits)``,
        ``stop_strings`` with ``tokenizer``, ``pad_token_id``; ``num_beams`` > 1 is refused."""
        batch = _batch(input_ids, attention_mask, kwargs)
        streamer = kwargs.pop("streamer", None)
        opts = GenerateOptions.take(self, kwargs)
        params = resolve_params(self, sampling_params, opts.config if sampling_params is None else None, **kwargs)
        pad = pad_id(self) if opts.pad_token_id is None else int(opts.pad_token_id)
        want_scores = opts.return_dict and (opts.output_scores or opts.output_logits)
        recorders: list[ScoreRecorder] = []

        def recorder_for(reqs) -> ScoreRecorder:  # the engine's hook, once its requests exist
            recorders.append(ScoreRecorder({r.id: i for i, r in enumerate(reqs)}, raw=opts.output_logits))
            return recorders[-1]

        sequences = generate(self, batch, params, streamer, tokenizer=opts.tokenizer if _has_stop_strings(params) else None,
                             pad=pad, on_logits=recorder_for if want_scores else None)
        if not opts.return_dict:
            return sequences
        out = GenerateOutput(sequences)
        if recorders:
            scores, logits = recorders[0].outputs(sequences.shape[1] - input_ids.shape[1], pad)
            out.scores = scores if opts.output_scores else None
            out.logits = logits
        return out

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
