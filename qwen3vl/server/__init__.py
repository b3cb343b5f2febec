"""OpenAI-compatible HTTP server and web chat page: ``qwen3vl serve`` (see ``serve.serve``)."""
from .app import create_app
from .serve import serve
from .settings import ServeSettings

__all__ = ["create_app", "serve", "ServeSettings"]
