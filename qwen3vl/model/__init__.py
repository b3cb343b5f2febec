"""The Qwen3-VL network: vision encoder, text decoder (dense and MoE), rotary tables, positions,
and ``Qwen3VL`` (one forward step; no knowledge of requests, sampling or cache layout)."""
