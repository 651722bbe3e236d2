"""OpenAI-compatible HTTP server on the continuous-batching engine."""

from mistral_nemo.server.app import create_app

__all__ = ["create_app"]
