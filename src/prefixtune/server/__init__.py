"""OpenAI-compatible HTTP server over the engine (imports the engine; the engine never imports this)."""

from prefixtune.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
