"""embedgate: an edge reverse proxy for embedding requests, as a pure ASGI component."""

from __future__ import annotations

from .app import create_app
from .config import Config, ConfigError, load_config
from .errors import GatewayError
from .gateway import EmbeddingGateway

__all__ = ["Config", "ConfigError", "EmbeddingGateway", "GatewayError", "create_app", "load_config"]
__version__ = "0.1.0"
