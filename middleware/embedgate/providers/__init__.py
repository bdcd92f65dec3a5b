"""Provider adapters: one upstream API each, behind the :class:`Adapter` protocol."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ProviderConfig
from .base import Adapter, AiohttpTransport, Embeddings, Sender, sender_for
from .http1 import Http1Transport
from .openai import OpenAIAdapter
from .proxies import ProxyRoutes, upstream_transport

__all__ = [
    "Adapter",
    "AiohttpTransport",
    "Embeddings",
    "Http1Transport",
    "OpenAIAdapter",
    "ProxyRoutes",
    "Sender",
    "build_adapter",
    "sender_for",
    "upstream_transport",
]


def build_adapter(provider: ProviderConfig, send: Sender, others: Sequence[ProviderConfig] = ()) -> Adapter:
    """The adapter for a configured provider (``type`` was validated with the config); ``others``: the other
    providers, whose keys its errors are scrubbed of too."""
    # openai and openai_compatible speak the same wire format; they differ only in which extras the upstream
    # accepts, which the upstream itself tells us with a 400.
    return OpenAIAdapter(provider, send, others)
