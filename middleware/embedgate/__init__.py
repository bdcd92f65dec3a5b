"""embedgate: an edge reverse proxy for embedding requests, as a pure ASGI component."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._native import guard

#: How this process runs embedgate: "compiled" (the mypyc build), "source", or "stale" (see ``_native``).
#: Decided before any other module of the package is imported: it chooses where they load from.
NATIVE = guard()

if TYPE_CHECKING:
    from .app import create_app
    from .config import Config, ConfigError, load_config
    from .errors import GatewayError
    from .gateway import EmbeddingGateway

__all__ = ["NATIVE", "Config", "ConfigError", "EmbeddingGateway", "GatewayError", "create_app", "load_config"]
__version__ = "0.1.0"

# The public names load with their modules on first use: ``from embedgate import EmbeddingGateway`` works as
# before, while the span-export helper process (``python -m embedgate.span_export``) imports only what it runs,
# not the gateway's HTTP client, numpy, starlette and the rest (~45 MB less resident memory in that process).
_LAZY = {
    "create_app": ".app",
    "Config": ".config",
    "ConfigError": ".config",
    "load_config": ".config",
    "GatewayError": ".errors",
    "EmbeddingGateway": ".gateway",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'embedgate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
