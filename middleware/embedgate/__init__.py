"""embedgate: an edge reverse proxy for embedding requests, as a pure ASGI component."""

from __future__ import annotations

from ._native import guard

#: How this process runs embedgate: "compiled" (the mypyc build), "source", or "stale" (see ``_native``).
#: Decided before any other module of the package is imported: it chooses where they load from.
NATIVE = guard()

from .app import create_app  # noqa: E402
from .config import Config, ConfigError, load_config  # noqa: E402
from .errors import GatewayError  # noqa: E402
from .gateway import EmbeddingGateway  # noqa: E402

__all__ = ["NATIVE", "Config", "ConfigError", "EmbeddingGateway", "GatewayError", "create_app", "load_config"]
__version__ = "0.1.0"
