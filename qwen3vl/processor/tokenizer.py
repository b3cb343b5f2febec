"""The checkpoint's tokenizer (tokenizer.json through the `tokenizers` library) and streaming decode.

Special tokens and their flags come from tokenizer_config.json's ``added_tokens_decoder`` so
that ``skip_special_tokens`` drops the same tokens as the reference tokenizer.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class Tokenizer:
    """Text <-> token ids for Qwen3-VL (byte-level BPE, no BOS token)."""

    def __init__(self, backend: _HFTokenizer, config: dict | None = None):
        self._tok = backend
        self.config = config or {}
        self._register_added_tokens(self.config.get("added_tokens_decoder") or {})
        # Qwen's ChatML tokens where the config names none (a bare tokenizer.json).
        self.eos_token = self._token_str(self.config.get("eos_token")) or "<|im_end|>"
        self.pad_token = self._token_str(self.config.get("pad_token")) or "<|endoftext|>"
        self.bos_token = self._token_str(self.config.get("bos_token"))
        self.unk_token = self._token_str(self.config.get("unk_token"))
        self.eos_token_id = self.convert_tokens_to_ids(self.eos_token)
        self.pad_token_id = self.convert_tokens_to_ids(self.pad_token)
        self.padding_side = self.config.get("padding_side", "right")  # transformers' default
        decoder = self._tok.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, t in decoder.items() if t.special)

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        backend = _HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg_path = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        return cls(backend, config)

    def to_json(self) -> str:
        """The whole tokenizer (added tokens included) as tokenizer.json text, for grammar engines."""
        return self._tok.to_str()

    def special_token(self, name: str, default: str) -> str:
        """A named special token (e.g. ``image_token``) as the config names it, at its top level or in
        ``extra_special_tokens``; ``default`` when it names none."""
        extra = self.config.get("extra_special_tokens")
        value = self.config.get(name) or (extra.get(name) if isinstance(extra, dict) else None)
        return self._token_str(value) or default

    @staticmethod
    def _token_str(value) -> str | None:
        if isinstance(value, dict):  # serialized AddedToken
            return value.get("content")
        return value

    def _register_added_tokens(self, decoder: dict) -> None:
        """Make the config's added tokens (and their special flag) authoritative."""
        tokens = []
        for idx, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            tok = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                             lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                             normalized=spec.get("normalized", False), special=spec.get("special", False))
            existing = self._tok.token_to_id(spec["content"])
            if existing is not None and existing != int(idx):
                raise ValueError(f"tokenizer_config.json puts {spec['content']!r} at {idx}, "
                                 f"tokenizer.json at {existing}")
            tokens.append(tok)
        if tokens:
            # add_tokens/add_special_tokens keep ids of tokens already in the vocabulary
            self._tok.add_special_tokens([t for t in tokens if t.special])
            self._tok.add_tokens([t for t in tokens if not t.special])

    # ------------------------------------------------------------------ encode
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------ decode
    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str:
        """Token ids (list, 1-D tensor/array) -> text. Keywords as transformers' ``decode``."""
        text = self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean(text, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs) -> list[str]:
        """A batch (list of lists, or 2-D tensor/array) -> list of texts."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        texts = self._tok.decode_batch([_as_id_list(s) for s in sequences], skip_special_tokens=skip_special_tokens)
        return [self._clean(t, clean_up_tokenization_spaces) for t in texts]

    def _clean(self, text: str, clean_up: bool | None) -> str:
        """transformers' ``clean_up_tokenization`` when asked (default: the tokenizer config's setting),
        with transformers' rule that BPE tokenizers skip it unless the config insists."""
        if clean_up is None:
            clean_up = bool(self.config.get("clean_up_tokenization_spaces", False))
        if not clean_up:
            return text
        bpe = type(getattr(self._tok, "model", None)).__name__ == "BPE"
        if bpe and not self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            return text  # transformers skips the WordPiece-era cleanup for BPE models (Qwen's) too
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(a, b)
        return text


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for streaming.

    ``add(ids)`` returns the new text, never ending in half a UTF-8 character (bytes of an
    unfinished character are held back until the character completes); ``flush()`` returns
    whatever is held back at the end. The deltas concatenate to ``tokenizer.decode(all_ids)``.
    Only a short window of ids since the last clean boundary is re-decoded at each step.
    """

    REPLACEMENT = "\ufffd"

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, window: int = 16):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.window = window
        self.ids: list[int] = []
        self._start = 0      # ids[_start:] are re-decoded; decoding is additive at this boundary
        self._emitted = 0    # chars of decode(ids[_start:]) already returned
        self.text = ""       # everything returned so far

    def add(self, token_ids: int | Iterable[int]) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.ids.extend(_as_id_list(token_ids))
        tail = self.tokenizer.decode(self.ids[self._start:], skip_special_tokens=self.skip_special_tokens)
        # a trailing U+FFFD may be an incomplete byte sequence that later tokens complete
        stable = tail.rstrip(self.REPLACEMENT)
        delta = stable[self._emitted:] if len(stable) > self._emitted else ""
        self._emitted += len(delta)
        if stable == tail and len(self.ids) - self._start >= self.window:
            # clean boundary: the text decoded so far can never change again
            self._start, self._emitted = len(self.ids), 0
        self.text += delta
        return delta

    def flush(self) -> str:
        """Return any held-back text (e.g. a genuinely invalid byte sequence at the very end)."""
        tail = self.tokenizer.decode(self.ids[self._start:], skip_special_tokens=self.skip_special_tokens)
        delta = tail[self._emitted:]
        self._start, self._emitted = len(self.ids), 0
        self.text += delta
        return delta
