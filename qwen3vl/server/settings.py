"""``ServeSettings``: everything ``qwen3vl serve`` needs, typed and checked once (the CLI builds
it from its arguments; a launcher or a test can build one directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass

DEMO_MODEL_NAME = "qwen3vl-demo"


@dataclass(frozen=True)
class ServeSettings:
    model: str | None = None                 # checkpoint folder or hub id; None: the tiny demo checkpoint
    host: str = "127.0.0.1"
    port: int = 8000                         # 0: any free port
    api_key: str | None = None               # required as "Authorization: Bearer KEY" on /v1 when set
    served_model_name: str | None = None     # the name clients use (default: from the model path)
    max_num_seqs: int = 8                    # requests decoded together (KV slots)
    max_model_len: int | None = None         # prompt + completion tokens per request (default: the model's, <= 8192)
    allowed_local_media_path: str | None = None  # local media allowed under this folder only; None: no local files
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None          # "int8" | "int4": weight-only, done while loading
    group_size: int = 64                     # int4 group size

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            raise ValueError(f"allowed_local_media_path is not a folder: {self.allowed_local_media_path}")

    @property
    def model_name(self) -> str:
        """The name the server answers to and reports."""
        if self.served_model_name:
            return self.served_model_name
        if self.model is None:
            return DEMO_MODEL_NAME
        return os.path.basename(os.path.normpath(self.model)) if os.path.isdir(self.model) else self.model

    @property
    def aliases(self) -> set[str]:
        """Other names a request may use for the served model (the --model argument as given)."""
        return {self.model} if self.model else set()
