"""`logit2prompt serve`: an OpenAI-compatible HTTP server in front of a local target."""

from .app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
