"""OpenAI-compatible HTTP server and web chat page: ``qwen3vl serve`` (see ``app.serve``)."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
